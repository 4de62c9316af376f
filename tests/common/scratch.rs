//! A directory for one test, under Cargo's temporary directory for tests, named after the test
//! file (the crate), the process and the test; removed at the end unless the test failed, when
//! its path is printed instead.

use std::fs;
use std::path::{Path, PathBuf};

pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let file = env!("CARGO_CRATE_NAME");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{file}-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}
