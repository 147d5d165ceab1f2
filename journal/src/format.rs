//! The data directory's format version, so a node never misreads data
//! written by a newer release, and a newer release knows what it opens.
//!
//! `DATA/FORMAT` holds one line, `keel-journal data format N`. What each
//! format is made of: the Raft log (raft-log's own files, entries encoded
//! with MessagePack, `raft_log_store.rs`), the state (`state/`: the streams'
//! state and Raft snapshots, magic `KEELSNP1`) and the record segments
//! (magic `KEELSEG1`, `records.rs`). A release reads every format up to its
//! own `DATA_FORMAT` and refuses a newer one at start, naming both, before
//! it touches anything; it writes the file when it creates a directory. A
//! directory with data but no file was written before the file existed:
//! that is format 1, and the file is added.
//!
//! Pure but for `ensure`, which reads and writes the file.

use std::io;
use std::path::Path;

/// The format this release writes, and the newest it reads.
pub const DATA_FORMAT: u32 = 1;
/// The file, in the data directory.
pub const FILE: &str = "FORMAT";
const PREFIX: &str = "keel-journal data format ";
/// Longest `FORMAT` file read (it is one short line).
const MAX_FILE_BYTES: u64 = 256;

/// The file's text for format `n`.
pub fn text(n: u32) -> String {
    format!("{PREFIX}{n}\n")
}

/// The format a `FORMAT` file names.
pub fn parse(text: &str) -> Result<u32, String> {
    let line = text.trim_end_matches(['\n', '\r']);
    let n = line
        .strip_prefix(PREFIX)
        .ok_or_else(|| format!("{FILE} does not start with {PREFIX:?}: {:?}", truncate(line)))?;
    n.parse::<u32>().map_err(|_| format!("{FILE} names no format number: {:?}", truncate(line)))
}

/// Whether this release can open data of format `found`.
pub fn check(found: u32, dir: &Path) -> Result<(), String> {
    if found == 0 {
        return Err(format!("{} names format 0, which no release writes", dir.join(FILE).display()));
    }
    if found > DATA_FORMAT {
        return Err(format!(
            "the data directory {} was written by a newer keel-journal (data format {found}); this one reads formats up to \
             {DATA_FORMAT}: run that newer release on it (a node is not downgraded in place: remove it and add a new one)",
            dir.display()
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks the format of `dir` (created if missing) and records it: the
/// error says what to do when this release cannot open it.
pub fn ensure(dir: &Path) -> io::Result<u32> {
    let path = dir.join(FILE);
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    match std::fs::metadata(&path) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            Err(invalid(format!("{} is {} bytes, not one short line", path.display(), m.len())))
        }
        Ok(_) => {
            let found = parse(&std::fs::read_to_string(&path)?).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
            check(found, dir).map_err(invalid)?;
            Ok(found)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A fresh directory, or one from before the file existed
            // (format 1): either way this release's format describes it.
            let tmp = dir.join(format!("{FILE}.tmp"));
            std::fs::write(&tmp, text(DATA_FORMAT))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(DATA_FORMAT)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_file_round_trips_and_newer_formats_are_refused() {
        assert_eq!(parse(&text(1)), Ok(1));
        assert_eq!(parse("keel-journal data format 7"), Ok(7));
        assert!(parse("keel-journal data format x\n").is_err());
        assert!(parse("").is_err());
        let dir = Path::new("/data/j1");
        assert!(check(DATA_FORMAT, dir).is_ok());
        let newer = check(DATA_FORMAT + 1, dir).unwrap_err();
        assert!(newer.contains("newer keel-journal") && newer.contains("/data/j1"), "{newer}");
        assert!(check(0, dir).is_err());
    }

    #[test]
    fn ensure_writes_reads_and_refuses() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(ensure(d.path()).unwrap(), DATA_FORMAT);
        assert_eq!(std::fs::read_to_string(d.path().join(FILE)).unwrap(), text(DATA_FORMAT));
        assert_eq!(ensure(d.path()).unwrap(), DATA_FORMAT, "read back");
        std::fs::write(d.path().join(FILE), text(DATA_FORMAT + 1)).unwrap();
        let e = ensure(d.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("newer keel-journal"), "{e}");
        std::fs::write(d.path().join(FILE), vec![b'x'; 1000]).unwrap();
        assert!(ensure(d.path()).is_err(), "an oversized file is refused, not read");
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = parse(&s);
        }
    }
}
