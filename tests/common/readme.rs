//! The README's checked examples: a fenced block with an HTML comment on the line before it,
//! `<!-- checked: NAME … -->`, which a reader of the rendered README does not see. tests/readme.rs
//! checks most of them; a test that runs an example itself (tests/nginx.rs serves with the nginx
//! one) reads it here too, so the README cannot drift from what is tested.

use std::fs;
use std::path::Path;

/// README.md's text.
pub fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text of the fenced block after the marker `<!-- checked: NAME`, and the fence's language.
pub fn checked_block(readme: &str, name: &str) -> (String, String) {
    let marker = format!("<!-- checked: {name}");
    let mut lines = readme.lines();
    let found = lines.by_ref().any(|l| {
        let l = l.trim();
        l.starts_with(&marker) && l.ends_with("-->") && l[marker.len()..].starts_with([' ', '-'])
    });
    assert!(
        found,
        "README.md has no block marked `{marker} -->`: an HTML comment on the line before the fenced block \
         that a test checks (put it back, or change the test with the README)"
    );
    let fence = lines.next().unwrap_or_default();
    assert!(
        fence.starts_with("```"),
        "README.md: the line after `{marker} -->` must open a fenced block, not {fence:?}"
    );
    let language = fence.trim_start_matches('`').trim().to_string();
    let body: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
    assert!(!body.is_empty(), "README.md: the block after `{marker} -->` is empty or never closed");
    (body.join("\n") + "\n", language)
}
