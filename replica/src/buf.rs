//! Buffers aligned for O_DIRECT, and the arena of registered slots most of
//! them live in.
//!
//! Architecture invariant: this module, [`crate::uring`] and
//! [`crate::crcmap`] (the CRC file's memory mapping) are the only ones of
//! the replica that contain `unsafe` code. Every `unsafe` block carries a
//! `SAFETY:` comment.
//!
//! Invariant: a slot of the arena is in its class's free list or owned by
//! exactly one [`AlignedBuf`], which gives it back when dropped; the arena
//! itself is never freed, so a ring's registration never outlives it.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of every [`AlignedBuf`]: what O_DIRECT needs on any device.
pub const ALIGN: usize = 4096;

/// A buffer aligned to [`ALIGN`] bytes: zero-filled by [`AlignedBuf::zeroed`],
/// a copy of the source by [`AlignedBuf::copy_from`], to be filled by a read
/// with [`AlignedBuf::for_read`]. It lives in a slot of
/// the registered [`Arena`] while one of its size is free, else on the heap.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    home: Home,
}

/// Where an [`AlignedBuf`]'s memory comes from, and so where it goes back.
enum Home {
    Heap(Layout),
    Slot {
        arena: &'static Arena,
        class: u8,
        index: u32,
    },
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Vec<u8>); no
// interior mutability, so moving it to or sharing it with other threads is
// sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; shared references only allow reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::for_read(len);
        if buf.in_arena() {
            buf.as_mut_slice().fill(0);
        }
        buf
    }

    /// A buffer of `len` bytes for a read to fill: an arena slot as it is,
    /// not cleared (a 1 MiB read no longer pays a 1 MiB `memset` first), or
    /// else a zeroed heap buffer.
    ///
    /// A slot's old bytes never reach a caller: both backends fail a read
    /// that does not fill its whole buffer (a short read is an error) and
    /// drop that buffer. Every byte of the arena is initialised (its mapping
    /// starts zeroed), so handing a slot to the kernel or to `read_exact_at`
    /// exposes no uninitialised memory.
    pub fn for_read(len: usize) -> Self {
        match Arena::get().and_then(|a| a.take(len)) {
            Some(buf) => buf,
            None => Self::heap(len, true),
        }
    }

    /// A buffer of `len` bytes on the heap, zero-filled or not.
    fn heap(len: usize, zeroed: bool) -> Self {
        let layout = Self::layout_for(len);
        // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
        let raw = unsafe {
            if zeroed {
                alloc_zeroed(layout)
            } else {
                alloc(layout)
            }
        };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            home: Home::Heap(layout),
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        Self::copy_from_chunks([data], data.len())
    }

    /// A buffer holding the concatenation of `chunks`, which must add up to
    /// exactly `len` bytes (checked: a shortfall panics rather than expose
    /// uninitialised memory). Not zero-filled first: every byte the buffer
    /// exposes is written by the copy.
    pub fn copy_from_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, len: usize) -> Self {
        // Owned from here, so the memory is given back if a check panics.
        let buf = Arena::get()
            .and_then(|a| a.take(len))
            .unwrap_or_else(|| Self::heap(len, false));
        let mut at = 0;
        for c in chunks {
            assert!(
                c.len() <= len - at,
                "chunks longer than the {len} bytes announced"
            );
            // SAFETY: `at + c.len() <= len`, within the allocation or slot;
            // both are exclusively ours, so they cannot overlap the chunk.
            unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), buf.ptr.as_ptr().add(at), c.len()) };
            at += c.len();
        }
        assert_eq!(at, len, "chunks shorter than the {len} bytes announced");
        buf
    }

    fn layout_for(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(ALIGN);
        match Layout::from_size_align(size, ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("buffer of {len} bytes is too large to allocate"),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the buffer is a slot of the arena, so a ring that
    /// registered the arena can use it without pinning its pages per request.
    pub fn in_arena(&self) -> bool {
        matches!(self.home, Home::Slot { .. })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation or arena slot of at least
        // `len` initialised bytes (zeroed or copied into) that is ours for
        // as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Turns the buffer into `Bytes` without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.home {
            // SAFETY: ptr was returned by alloc or alloc_zeroed with exactly
            // this layout and is freed only here, once.
            Home::Heap(layout) => unsafe { dealloc(self.ptr.as_ptr(), layout) },
            Home::Slot {
                arena,
                class,
                index,
            } => arena.give_back(class, index),
        }
    }
}

/// Size classes of the arena's slots: (slot size, number of slots). A
/// buffer takes a slot of the smallest class that fits it and has one free;
/// larger buffers, and any while their class is exhausted, live on the heap.
/// 4 KiB covers small random writes at any depth the engine sends, 1 MiB the
/// usual largest request of a filesystem or a sequential writer.
const CLASSES: [(usize, usize); 3] = [(4 << 10, 1024), (64 << 10, 128), (1 << 20, 20)];

/// The process's registered buffer arena: one mapping, carved into
/// fixed-size slots, registered with every [`Ring`] as buffer 0.
///
/// Without it, the kernel pins and unpins the pages of every O_DIRECT
/// request's buffer (`get_user_pages` and its release: 5% of the replica's
/// CPU at 1 MiB writes). A registered buffer's pages are pinned once, when
/// it is registered, and `READ_FIXED`/`WRITE_FIXED` entries use them as
/// they are. The arena is one mapping advised onto huge pages (see
/// [`map_huge`]), so each slot is physically contiguous.
///
/// Invariant: the arena is never freed (it lives in a `static`), so no
/// registration can outlive its memory. A slot is in its class's free list
/// or owned by exactly one `AlignedBuf`, which gives it back when dropped;
/// the ring keeps the `AlignedBuf` of every entry in flight, so a slot is
/// not reused while the kernel may still read or write it.
pub(crate) struct Arena {
    base: NonNull<u8>,
    len: usize,
    /// (slot size, number of slots) per class: [`CLASSES`] but in tests.
    classes: [(usize, usize); CLASSES.len()],
    /// Free slot indices, one list per class.
    free: [Mutex<Vec<u32>>; CLASSES.len()],
    /// Offset of each class's first slot from `base`.
    starts: [usize; CLASSES.len()],
}

// SAFETY: the arena's memory is only reached through slots, each owned by
// one AlignedBuf at a time (see the invariant above); the free lists are
// behind mutexes.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

static ARENA: std::sync::OnceLock<Option<Arena>> = std::sync::OnceLock::new();

impl Arena {
    /// The arena, once the first ring has set it up.
    fn get() -> Option<&'static Arena> {
        ARENA.get().and_then(Option::as_ref)
    }

    /// The arena, set up on first use; None when its memory cannot be had.
    pub(crate) fn get_or_init() -> Option<&'static Arena> {
        ARENA.get_or_init(|| Arena::new(CLASSES)).as_ref()
    }

    /// A new arena with `classes[i].1` slots of `classes[i].0` bytes; None
    /// when its memory cannot be had.
    fn new(classes: [(usize, usize); CLASSES.len()]) -> Option<Arena> {
        let mut starts = [0; CLASSES.len()];
        let mut len = 0;
        for (start, (size, count)) in starts.iter_mut().zip(classes) {
            *start = len;
            len += size * count;
        }
        let base = map_huge(len.max(ALIGN).next_multiple_of(ALIGN))?;
        Some(Arena {
            base,
            len,
            classes,
            free: classes.map(|(_, count)| Mutex::new((0..count as u32).rev().collect())),
            starts,
        })
    }

    /// The iovec that registers the whole arena.
    pub(crate) fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.as_ptr().cast(),
            iov_len: self.len,
        }
    }

    /// An uninitialised slot for `len` bytes (to be filled by the caller
    /// before it is read), or None when no class fits one free.
    fn take(&'static self, len: usize) -> Option<AlignedBuf> {
        let class = self.classes.iter().position(|&(size, _)| len <= size)?;
        for c in class..self.classes.len() {
            let got = self.free[c].lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(index) = got {
                let offset = self.starts[c] + index as usize * self.classes[c].0;
                // SAFETY: `offset` plus the slot size is within the arena's
                // `len` bytes (the starts were summed from the classes).
                let ptr = unsafe { self.base.add(offset) };
                return Some(AlignedBuf {
                    ptr,
                    len,
                    home: Home::Slot {
                        arena: self,
                        class: c as u8,
                        index,
                    },
                });
            }
        }
        None
    }

    /// Logs how much of the arena the kernel backs with huge pages: all of
    /// it normally; otherwise a 1 MiB disk request from the rest may be
    /// split in two, which an operator can fix (THP `madvise` or `always`).
    pub(crate) fn report_huge_pages(&self) {
        let (mib, total) = (1 << 20, self.len);
        let huge = smaps_field(self.base.as_ptr() as usize, total, "AnonHugePages:")
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kib| (kib << 10).min(total));
        match huge {
            Some(huge) if huge == total => {
                tracing::info!("buffer arena: {} MiB, all on huge pages", total / mib)
            }
            Some(huge) => tracing::warn!(
                "buffer arena: only {} of {} MiB on huge pages (transparent huge pages \
                 disabled, or memory fragmented); 1 MiB disk requests from the rest \
                 may be split in two on a virtio disk. Set \
                 /sys/kernel/mm/transparent_hugepage/enabled to madvise or always",
                huge / mib,
                total / mib
            ),
            None => tracing::info!(
                "buffer arena: {} MiB; /proc/self/smaps does not say whether it is on huge pages",
                total / mib
            ),
        }
    }

    fn give_back(&self, class: u8, index: u32) {
        self.free[class as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(index);
    }
}

/// The value after `field` (such as `AnonHugePages:`) in /proc/self/smaps
/// for the mapping that holds `[base, base + len)` (it may have merged with
/// a neighbour); None when smaps cannot be read or has no such mapping.
fn smaps_field(base: usize, len: usize, field: &str) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = lo <= base && base + len <= hi;
        } else if inside && let Some(v) = line.strip_prefix(field) {
            return Some(v.trim().to_owned());
        }
    }
    None
}

/// Size and alignment of a transparent huge page on x86-64 and arm64 (4 KiB
/// base pages).
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed anonymous mapping of `len` bytes (a multiple of [`ALIGN`]) at a
/// [`HUGE_PAGE`]-aligned address, advised to be backed by transparent huge
/// pages; None when the kernel refuses the mapping. Never unmapped.
///
/// Why: a buffer of 4 KiB pages is as many scatter-gather segments as pages
/// unless the pages happen to be physically adjacent, and a device takes a
/// bounded number of segments per request (254 on virtio-blk): a 1 MiB
/// O_DIRECT request from such a buffer reaches the disk as two. Inside a huge
/// page a slot is physically contiguous, one segment, so each 1 MiB read or
/// write is one disk request (measured here: a 1 MiB copy at depth 16 took
/// half the disk time with huge-page buffers). Where huge pages cannot be
/// had (THP disabled, memory fragmented) the mapping is ordinary pages and
/// everything works as before.
fn map_huge(len: usize) -> Option<NonNull<u8>> {
    let span = len.checked_add(HUGE_PAGE)?;
    // SAFETY: a new private anonymous mapping at an address of the kernel's
    // choosing; it aliases nothing.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let head = (raw as usize).next_multiple_of(HUGE_PAGE) - raw as usize;
    let tail = span - head - len;
    // SAFETY: `head + len + tail == span`, so both trims and the advised
    // range lie inside the mapping just made, whose first `head` and last
    // `tail` bytes nothing else refers to. A failed trim or advice leaves
    // unused address space or ordinary pages: harmless, so not checked.
    unsafe {
        let base = raw.cast::<u8>().add(head);
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap(base.add(len).cast(), tail);
        }
        libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE);
        NonNull::new(base)
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaked_arena(classes: [(usize, usize); CLASSES.len()]) -> &'static Arena {
        Box::leak(Box::new(Arena::new(classes).expect("arena memory")))
    }

    fn class_of(b: &AlignedBuf) -> Option<u8> {
        match b.home {
            Home::Slot { class, .. } => Some(class),
            Home::Heap(_) => None,
        }
    }

    #[test]
    fn a_buffer_takes_the_smallest_free_class_that_fits_and_gives_its_slot_back() {
        let a = leaked_arena([(4096, 2), (8192, 1), (16384, 0)]);
        let small = a.take(100).unwrap();
        let full = a.take(4096).unwrap();
        assert_eq!((class_of(&small), class_of(&full)), (Some(0), Some(0)));
        // Class 0 is exhausted: the next small buffer takes a larger slot.
        let spill = a.take(10).unwrap();
        assert_eq!(class_of(&spill), Some(1));
        assert!(a.take(1).is_none(), "every slot is taken");
        assert!(
            a.take(16384).is_none(),
            "the only class that fits has no slots"
        );
        assert!(a.take(16385).is_none(), "no class fits");
        let mut ptrs: Vec<usize> = [&small, &full, &spill]
            .iter()
            .map(|b| b.as_slice().as_ptr() as usize)
            .collect();
        for p in &ptrs {
            assert_eq!(p % ALIGN, 0);
            let base = a.base.as_ptr() as usize;
            assert!(
                *p >= base && *p + 4096 <= base + a.len,
                "slot inside the arena"
            );
        }
        ptrs.sort();
        ptrs.dedup();
        assert_eq!(ptrs.len(), 3, "slots are distinct");
        let given_back = full.as_slice().as_ptr();
        drop(full);
        let again = a.take(4096).unwrap();
        assert_eq!(again.as_slice().as_ptr(), given_back);
        assert_eq!((again.len(), class_of(&again)), (4096, Some(0)));
    }

    #[test]
    fn the_arena_starts_on_a_huge_page_and_is_advised_to_use_huge_pages() {
        let a = leaked_arena(CLASSES);
        let base = a.base.as_ptr() as usize;
        assert_eq!(base % HUGE_PAGE, 0, "arena at {base:#x}");
        // Every slot of every class lies inside one huge page, so it is
        // physically contiguous when the arena got huge pages.
        for (c, &(size, count)) in CLASSES.iter().enumerate() {
            let first = a.starts[c];
            assert_eq!(
                first % size,
                0,
                "class {c} starts on a multiple of its size"
            );
            assert!(
                HUGE_PAGE.is_multiple_of(size),
                "class {c}'s slots do not straddle huge pages"
            );
            assert!(first + size * count <= a.len);
        }
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            eprintln!("transparent huge pages are off here: nothing more to check");
            return;
        }
        // The mapping holding the arena (it may have merged with a
        // neighbour) is eligible for huge pages: the advice was taken.
        let eligible = smaps_field(base, a.len, "THPeligible:");
        assert_eq!(
            eligible.as_deref(),
            Some("1"),
            "the arena's mapping in /proc/self/smaps"
        );
    }

    #[test]
    fn copies_and_zeroed_buffers_in_reused_slots_hold_exactly_their_bytes() {
        Arena::get_or_init().expect("arena memory");
        let dirty: Vec<AlignedBuf> = (0..64)
            .map(|i| AlignedBuf::copy_from(&[i as u8 + 1; 4096]))
            .collect();
        assert!(dirty.iter().any(AlignedBuf::in_arena));
        for (i, b) in dirty.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1), "buffer {i}");
        }
        drop(dirty);
        let zeroed: Vec<AlignedBuf> = (0..64).map(|_| AlignedBuf::zeroed(4096)).collect();
        assert!(zeroed.iter().any(AlignedBuf::in_arena));
        assert!(zeroed.iter().all(|b| b.as_slice().iter().all(|&x| x == 0)));
        // Too large for any slot: on the heap, same contract.
        let big = AlignedBuf::copy_from(&vec![9u8; (1 << 20) + 1]);
        assert!(!big.in_arena());
        assert!(big.as_slice().iter().all(|&x| x == 9));
    }
}
