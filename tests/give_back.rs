//! Free memory given back to the system (`dongflow::memory`), in a process of its own: the test
//! reads the process's RSS, which another test running beside it would move.

/// Freed memory in the middle of the heap, under a live allocation, leaves the process once given
/// back.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
#[test]
fn freed_memory_under_live_memory_is_given_back() {
    fn rss() -> u64 {
        let me = procfs::process::Process::myself().expect("/proc/self");
        me.stat().expect("/proc/self/stat").rss * procfs::page_size()
    }
    // 200 MB in small blocks (below the mmap threshold: in the heap), written, then a live block
    // above them, then the small blocks freed: the allocator keeps their pages.
    let blocks: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 1000]).collect();
    let top = vec![2u8; 1000];
    drop(blocks);
    let before = rss();
    assert!(dongflow::memory::give_back(), "something to give back");
    let after = rss();
    assert!(
        after + 100_000_000 < before,
        "RSS {before} B before, {after} B after giving back"
    );
    assert_eq!(top[999], 2);
}
