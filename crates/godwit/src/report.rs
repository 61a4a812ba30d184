//! The migration report (`migrate -r FILE`): the engine's statistics with every pre-copy
//! round, as JSON. The chart is drawn from it by `bench/`.

use migration::stats::Stats;
use std::path::Path;

pub fn write(path: &Path, st: &Stats) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(st).map_err(std::io::Error::other)?;
    std::fs::write(path, json)
}
