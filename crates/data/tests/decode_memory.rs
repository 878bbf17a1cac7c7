//! Hostile headers must be refused before anything of the declared size is allocated. This
//! binary counts allocations with its own global allocator and holds a single test, so no other
//! test's allocations mix in.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{jpeg_bytes, jpeg_declaring, png_bytes};

/// The system allocator, remembering the largest single request.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f`, which must fail, and returns the largest allocation it made and its message.
fn largest_allocation<T>(f: impl FnOnce() -> Result<T, String>) -> (usize, String) {
    LARGEST.store(0, Ordering::Relaxed);
    let msg = match f() {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    (LARGEST.load(Ordering::Relaxed), msg)
}

const MIB: usize = 1 << 20;

#[test]
fn hostile_headers_allocate_nothing_of_their_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let raw = vec![0u8; 4 * 1001];
    let files = [
        ("mask_100k.png", png_bytes(100_000, 100_000, 0, 8, &raw)),
        ("mask_tall.png", png_bytes(1, (1 << 31) - 1, 0, 8, &raw)),
        ("mask_rgba16.png", png_bytes(60_000, 60_000, 6, 16, &raw)),
    ];
    for (name, bytes) in &files {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let (big, msg) = largest_allocation(|| data::label::read_mask_png(&path).map_err(|e| e.to_string()));
        assert!(big < 16 * MIB, "{name}: allocated {big} bytes before refusing ({msg})");
        assert!(msg.contains(name) && msg.contains("declares"), "{msg}");
        let (big, msg) = largest_allocation(|| data::dataset::decode_image(&path).map_err(|e| e.to_string()));
        assert!(big < 16 * MIB, "{name} as an image: allocated {big} bytes before refusing ({msg})");
        assert!(msg.contains(name), "{msg}");
    }
    let jpeg = dir.path().join("huge.jpg");
    std::fs::write(&jpeg, jpeg_declaring(&jpeg_bytes(32, 16), 65_000, 65_000)).unwrap();
    let (big, msg) = largest_allocation(|| data::dataset::decode_image(&jpeg).map_err(|e| e.to_string()));
    assert!(big < 16 * MIB, "allocated {big} bytes before refusing ({msg})");
    assert!(msg.contains("huge.jpg") && msg.contains("declares 65000x65000"), "{msg}");

    // A shard folder index whose checksum is right but whose first string claims 2^40 bytes:
    // bincode must refuse the length before allocating it.
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let mut payload = vec![data::shard::SHARD_FORMAT_VERSION as u8, 0xFD];
    payload.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut file = b"MMFINDEX".to_vec();
    file.extend_from_slice(&data::shard::SHARD_FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    file.extend_from_slice(&payload);
    std::fs::write(shards.join("index.bin"), &file).unwrap();
    let (big, msg) = largest_allocation(|| data::shard::ShardIndex::load(&shards).map_err(|e| e.to_string()));
    assert!(big < 16 * MIB, "allocated {big} bytes for a 10-byte index ({msg})");
    assert!(msg.contains("index.bin") && msg.contains("malformed"), "{msg}");

    // The limit can be moved: from code, and with MMFORMER_MAX_PIXELS (this binary runs one
    // test, so changing the process-wide setting races with nothing).
    let small = dir.path().join("small.png");
    data::label::write_gray_png(&small, 16, 16, &[0; 256]).unwrap();
    data::label::read_mask_png(&small).unwrap();
    data::set_max_pixels(Some(255));
    let e = data::label::read_mask_png(&small).unwrap_err().to_string();
    assert!(e.contains("small.png: mask PNG declares 16x16 pixels, more than the limit of 255"), "{e}");
    data::set_max_pixels(None);
    data::label::read_mask_png(&small).unwrap();
    std::env::set_var(data::MAX_PIXELS_ENV, "200");
    let e = data::dataset::decode_image(&small).unwrap_err().to_string();
    assert!(e.contains("small.png: image declares 16x16 pixels, more than the limit of 200"), "{e}");
    std::env::set_var(data::MAX_PIXELS_ENV, "lots");
    let e = data::label::read_mask_png(&small).unwrap_err().to_string();
    assert!(e.contains("MMFORMER_MAX_PIXELS=\"lots\""), "{e}");
    std::env::set_var(data::MAX_PIXELS_ENV, "1_000_000_000");
    let (big, msg) = largest_allocation(|| data::label::read_mask_png(&dir.path().join("mask_100k.png")).map_err(|e| e.to_string()));
    assert!(big < 16 * MIB && msg.contains("limit of 1000000000"), "{big}: {msg}");
    std::env::remove_var(data::MAX_PIXELS_ENV);
    data::dataset::decode_image(&small).unwrap();
}
