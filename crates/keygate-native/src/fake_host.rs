//! A fake Envoy configuration host for the unit tests of the module's configuration hooks (the
//! key-set sync's, usage reporting's): it records stats and log lines.

use crate::filter::{ConfigHost, Level, Log};
use std::cell::RefCell;

/// A configuration host that records stats and log lines.
#[derive(Default)]
pub struct FakeConfig {
    pub lines: RefCell<Vec<String>>,
    pub gauges: Vec<(String, u64)>,
    pub counters: Vec<(String, u64)>,
}

impl Log for FakeConfig {
    fn enabled(&self, _: Level) -> bool {
        true
    }
    fn log(&self, _: Level, message: &str) {
        self.lines.borrow_mut().push(message.to_string());
    }
}

impl ConfigHost for FakeConfig {
    fn define_counter(&mut self, name: &str) -> Option<usize> {
        self.counters.push((name.to_string(), 0));
        Some(self.counters.len() - 1)
    }
    fn define_gauge(&mut self, name: &str) -> Option<usize> {
        self.gauges.push((name.to_string(), 0));
        Some(self.gauges.len() - 1)
    }
    fn set_gauge(&mut self, id: usize, value: u64) {
        self.gauges[id].1 = value;
    }
    fn increment_counter(&mut self, id: usize) {
        self.counters[id].1 += 1;
    }
}

impl FakeConfig {
    /// A gauge's value; `None` if it was never defined.
    pub fn gauge(&self, name: &str) -> Option<u64> {
        self.gauges.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
    /// A counter's value, summed over every definition of its name (as Envoy keeps one stat per
    /// name); `None` if it was never defined.
    pub fn counter(&self, name: &str) -> Option<u64> {
        let mut found = self.counters.iter().filter(|(n, _)| n == name).peekable();
        found.peek()?;
        Some(found.map(|(_, v)| *v).sum())
    }
}
