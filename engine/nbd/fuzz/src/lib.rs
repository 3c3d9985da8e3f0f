//! What the NBD fuzz targets share: their seed inputs.

/// Writes `seeds` (valid inputs made by the code's own encoders) into the
/// directory named by `ZEBU_FUZZ_SEEDS`, if set, as `seed-0`, `seed-1`, …
/// A target calls it from its `init`, which runs before libFuzzer reads its
/// corpus directories: `.ci/fuzz` names the corpus directory, so every run
/// starts from at least these.
pub fn write_seeds(seeds: impl IntoIterator<Item = Vec<u8>>) {
    let Some(dir) = std::env::var_os("ZEBU_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("creating the seed directory");
    for (i, seed) in seeds.into_iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed).expect("writing a seed");
    }
}
