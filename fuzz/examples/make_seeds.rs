//! Writes the seed corpus, `corpus/<target>/seed-<n>`, from `ipcbus_fuzz::seeds()`.
//!
//! ```text
//! cd fuzz && cargo run --example make_seeds
//! ```

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut n = std::collections::HashMap::<&str, usize>::new();
    for (target, bytes) in ipcbus_fuzz::seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        let i = n.entry(target).or_default();
        *i += 1;
        std::fs::write(dir.join(format!("seed-{i}")), bytes)?;
    }
    for (t, i) in &n {
        println!("{t}: {i} seeds");
    }
    Ok(())
}
