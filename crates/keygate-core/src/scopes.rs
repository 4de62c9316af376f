//! Scope grants: exact names, `prefix*` wildcards, and `scope_implies` (transitive).

use std::collections::{BTreeMap, HashMap};

/// Compiled scope rules.
#[derive(Debug, Default)]
pub struct ScopeRules {
    /// For each scope that implies others: everything it implies, directly or not (itself excluded).
    implied: HashMap<String, Vec<String>>,
}

impl ScopeRules {
    /// Compiles `scope_implies`, following chains (`admin` → `read_write` → `read`) and cycles.
    pub fn new(implies: &BTreeMap<String, Vec<String>>) -> Self {
        let mut implied = HashMap::new();
        for root in implies.keys() {
            let mut seen: Vec<String> = Vec::new();
            let mut stack: Vec<&String> = implies.get(root).map(|v| v.iter().collect()).unwrap_or_default();
            while let Some(scope) = stack.pop() {
                if scope == root || seen.contains(scope) {
                    continue;
                }
                seen.push(scope.clone());
                if let Some(next) = implies.get(scope) {
                    stack.extend(next.iter());
                }
            }
            implied.insert(root.clone(), seen);
        }
        ScopeRules { implied }
    }

    /// True if a key holding `held` may use `required`.
    pub fn grants(&self, held: &str, required: &str) -> bool {
        grants_directly(held, required)
            || self.implied.get(held).is_some_and(|more| more.iter().any(|h| grants_directly(h, required)))
    }

    /// The required scopes that none of the held scopes grants, in the route's order.
    pub fn missing<'r>(&self, held: &[String], required: &'r [String]) -> Vec<&'r str> {
        required.iter().filter(|r| !held.iter().any(|h| self.grants(h, r))).map(String::as_str).collect()
    }
}

fn grants_directly(held: &str, required: &str) -> bool {
    match held.strip_suffix('*') {
        Some(prefix) => required.starts_with(prefix),
        None => held == required,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, &[&str])]) -> ScopeRules {
        let map = pairs.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect();
        ScopeRules::new(&map)
    }

    fn owned(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_scope_grants_itself_only() {
        let r = rules(&[]);
        assert!(r.grants("read:bookings", "read:bookings"));
        assert!(!r.grants("read:bookings", "read:contacts"));
        assert!(!r.grants("read", "read:bookings"));
    }

    #[test]
    fn wildcard_grants_its_prefix() {
        let r = rules(&[]);
        assert!(r.grants("read:*", "read:bookings"));
        assert!(!r.grants("read:*", "write:bookings"));
        assert!(r.grants("*", "webhooks:manage"));
    }

    #[test]
    fn implication_is_transitive_and_survives_cycles() {
        let r = rules(&[("admin", &["read_write"]), ("read_write", &["read", "admin"]), ("ops", &["read:*"])]);
        assert!(r.grants("admin", "read"));
        assert!(r.grants("read_write", "read"));
        assert!(!r.grants("read", "read_write"));
        assert!(r.grants("ops", "read:calls"));
    }

    #[test]
    fn missing_lists_ungranted_scopes_in_route_order() {
        let r = rules(&[("read_write", &["read"])]);
        let required = owned(&["write:a", "read", "write:b"]);
        assert_eq!(r.missing(&owned(&["read_write"]), &required), ["write:a", "write:b"]);
        assert!(r.missing(&owned(&["*"]), &required).is_empty());
    }
}
