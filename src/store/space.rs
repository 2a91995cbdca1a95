//! What a failed RocksDB write means: the one place that tells a full disk (which heals by
//! itself once space is freed) and a write stall (which passes) from any other storage error.

use std::path::Path;

use super::StoreError;

/// The texts RocksDB gives a full filesystem: `IOStatus::NoSpace` (ENOSPC, possibly wrapped as
/// "Result incomplete: IO error: No space left on device: ...") and `kSpaceLimit`.
const NO_SPACE: [&str; 2] = ["No space left on device", "Space limit reached"];

/// With `no_slowdown` a write the write controller would delay fails with this instead.
const STALL: &str = "Write stall";

/// The error a failed write of the database under `dir` stands for. `needed_bytes` is the free
/// space RocksDB waits for before it resumes writing by itself (its largest write buffer).
/// (RocksDB's errors are only their text.)
pub fn classify(message: String, dir: &Path, needed_bytes: u64) -> StoreError {
    if NO_SPACE.iter().any(|s| message.contains(s)) {
        StoreError::NoSpace { dir: dir.to_path_buf(), free_bytes: free_bytes(dir).unwrap_or(0), needed_bytes }
    } else if message.contains(STALL) {
        StoreError::Busy(message)
    } else {
        StoreError::Rocks(message)
    }
}

impl StoreError {
    /// The same error, with the free space as it is now.
    pub fn refreshed(self) -> StoreError {
        match self {
            StoreError::NoSpace { dir, needed_bytes, .. } => {
                StoreError::NoSpace { free_bytes: free_bytes(&dir).unwrap_or(0), dir, needed_bytes }
            }
            other => other,
        }
    }
}

/// Free bytes on the filesystem of `dir` as RocksDB counts them when it decides to resume: the
/// blocks reserved for root count for root.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid out-pointer for the call's duration.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // SAFETY: geteuid cannot fail.
    let blocks = if unsafe { libc::geteuid() } == 0 { st.f_bfree } else { st.f_bavail };
    Some(blocks as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_from_a_stall_and_from_other_errors() {
        let dir = tempfile::tempdir().unwrap();
        let classify = |m: &str| classify(m.to_string(), dir.path(), 1 << 20);
        let full = "IO error: No space left on device: While appending to file: /d/000008.log: No space left on device";
        for m in [full, &format!("Result incomplete: {full}"), "IO error: Space limit reached"] {
            match classify(m) {
                StoreError::NoSpace { dir: d, free_bytes, needed_bytes } => {
                    assert_eq!((d.as_path(), needed_bytes), (dir.path(), 1 << 20));
                    assert!(free_bytes > 0, "statvfs of a real directory");
                }
                other => panic!("{m}: {other:?}"),
            }
        }
        assert!(matches!(classify("Result incomplete: Write stall"), StoreError::Busy(_)));
        assert!(matches!(classify("Corruption: bad block"), StoreError::Rocks(_)));
    }
}
