//! Hostile and broken `.pth` files: every one is a clean one-line error naming the file (and the
//! key where there is one), nothing in them runs, nothing panics, and no file can make the
//! reader allocate much more than its own size.
//!
//! This test binary counts allocations per thread ([`measure`]) and refuses any single
//! allocation above 1 GiB outright: a reader that asks for one aborts the binary ("memory
//! allocation of N bytes failed"), which fails the run loudly instead of swapping.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use backbone::{BackboneError, StateDict};
use candle_core::Device;

mod common;
use common::{
    f32_bytes, fixture, legacy_file, legacy_fixture_bytes, torch_zip, unzip, zip_file, Member,
    Pickle,
};

// --- Allocation accounting

struct Counting;

thread_local! {
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

const DENY_ABOVE: usize = 1 << 30;

fn account(delta: isize) {
    let _ = CURRENT.try_with(|c| {
        let v = c.get() + delta;
        c.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > DENY_ABOVE {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            account(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > DENY_ABOVE {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            account(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        account(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > DENY_ABOVE {
            return std::ptr::null_mut();
        }
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            account(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `f`'s result and the peak bytes this thread held above what it held before.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.with(|c| c.get());
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(|p| p.get()) - base;
    (out, peak.max(0) as usize)
}

const MIB: usize = 1 << 20;

// --- Helpers

fn read(name: &str, bytes: &[u8]) -> Result<StateDict, BackboneError> {
    StateDict::from_bytes(name, bytes, None, &Device::Cpu)
}

/// Reads `bytes` (named `name`) expecting an error; checks that it names the file, that the
/// reader held less than `max_bytes`, and returns it.
fn refused(name: &str, bytes: &[u8], max_bytes: usize) -> BackboneError {
    let (r, peak) = measure(|| read(name, bytes));
    let err = match r {
        Ok(sd) => panic!("{name}: read {} tensors, expected an error", sd.len()),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains(name),
        "{name}: the error does not name the file: {msg}"
    );
    assert!(!msg.contains('\n'), "{name}: not one line: {msg}");
    assert!(
        peak < max_bytes,
        "{name}: the reader held {peak} bytes (limit {max_bytes}) before refusing: {msg}"
    );
    err
}

/// `{"model": {"w": <tensor of 4 f32 in storage "0">}, <extra>}` as a torch zip: a valid
/// checkpoint into which the tests put one hostile piece.
fn checkpoint_with(extra: impl Fn(&mut Pickle)) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b"}(").str("model").op(b"}(").str("w");
    p.zip_tensor("FloatStorage", "0", 4, 0, &[4], &[1]);
    p.op(b"u");
    extra(&mut p);
    p.op(b"u");
    torch_zip(p.stop(), &[("0", f32_bytes(&[1., 2., 3., 4.]))])
}

/// A zip holding `{"model": {"w": <what `tensor` writes>}}` and storage "0" of 4 f32.
fn model_with(tensor: impl Fn(&mut Pickle)) -> Vec<u8> {
    let mut p = Pickle::new();
    p.op(b"}(").str("model").op(b"}(").str("w");
    tensor(&mut p);
    p.op(b"uu");
    torch_zip(p.stop(), &[("0", f32_bytes(&[1., 2., 3., 4.]))])
}

// --- Globals outside the whitelist: refused, naming the key and the global; nothing runs.

#[test]
fn a_reduce_calling_os_system_is_refused_naming_the_global_and_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let cmd = format!("touch {}", marker.display());
    // What `torch.save({"model": Evil()}, f)` writes when `Evil.__reduce__` returns
    // `(os.system, (cmd,))` on Linux (os.system lives in `posix`).
    let mut p = Pickle::new();
    p.op(b"}(")
        .str("model")
        .global("posix", "system")
        .str(&cmd)
        .op(b"\x85Ru");
    let evil = torch_zip(p.stop(), &[]);
    let path = dir.path().join("evil.pth");
    std::fs::write(&path, &evil).unwrap();
    for err in [
        StateDict::read(&path, &Device::Cpu).unwrap_err(),
        refused("evil.pth", &evil, MIB),
    ] {
        match &err {
            BackboneError::ForbiddenGlobal { key, global, .. } => {
                assert_eq!((key.as_str(), global.as_str()), ("model", "posix.system"));
            }
            other => panic!("expected ForbiddenGlobal, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("evil.pth") && msg.contains("`model`") && msg.contains("posix.system"),
            "{msg}"
        );
    }
    assert!(!marker.exists(), "the command ran");
}

#[test]
fn every_way_of_calling_a_global_is_refused() {
    let cmd = "echo pwned";
    let pk = |f: &dyn Fn(&mut Pickle)| {
        let mut p = Pickle::new();
        f(&mut p);
        p.stop()
    };
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "stack_global",
            {
                // Protocol 4: STACK_GLOBAL from two short strings.
                let mut b = vec![0x80, 4, b'}', b'(', 0x8c, 5];
                b.extend_from_slice(b"model");
                b.extend_from_slice(&[0x8c, 2]);
                b.extend_from_slice(b"os");
                b.extend_from_slice(&[0x8c, 6]);
                b.extend_from_slice(b"system");
                b.push(0x93);
                b.extend_from_slice(&[0x8c, cmd.len() as u8]);
                b.extend_from_slice(cmd.as_bytes());
                b.extend_from_slice(b"\x85Ru.");
                b
            },
            "model",
            "os.system",
        ),
        (
            "inst",
            pk(&|p| {
                p.op(b"}(")
                    .str("model")
                    .op(b"(")
                    .str(cmd)
                    .op(b"ios\nsystem\nu");
            }),
            "model",
            "os.system",
        ),
        (
            "obj",
            pk(&|p| {
                p.op(b"}(")
                    .str("model")
                    .op(b"(")
                    .global("os", "system")
                    .str(cmd)
                    .op(b"ou");
            }),
            "model",
            "os.system",
        ),
        (
            "newobj",
            pk(&|p| {
                p.op(b"}(")
                    .str("model")
                    .global("__main__", "Evil")
                    .op(b")\x81u");
            }),
            "model",
            "__main__.Evil",
        ),
        (
            "build",
            pk(&|p| {
                p.op(b"}(")
                    .str("model")
                    .global("__main__", "Evil")
                    .op(b")R}bu");
            }),
            "model",
            "__main__.Evil",
        ),
        (
            "eval_in_optimizer",
            pk(&|p| {
                p.op(b"}(").str("model").op(b"}").str("optimizer");
                p.global("builtins", "eval").str(cmd).op(b"\x85Ru");
            }),
            "optimizer",
            "builtins.eval",
        ),
        (
            "deep_in_optimizer_state",
            pk(&|p| {
                p.op(b"}(")
                    .str("optimizer")
                    .op(b"}(")
                    .str("state")
                    .op(b"}(K\x00");
                p.global("posix", "system").str(cmd).op(b"\x85Ruuu");
            }),
            "optimizer.state[0]",
            "posix.system",
        ),
        (
            "global_as_a_value",
            pk(&|p| {
                p.op(b"}(")
                    .str("model")
                    .global("subprocess", "Popen")
                    .op(b"u");
            }),
            "model",
            "subprocess.Popen",
        ),
        (
            "rebuild_function_not_whitelisted",
            pk(&|p| {
                p.op(b"}(").str("model").op(b"}(").str("w");
                p.global("torch._utils", "_rebuild_device_tensor_from_numpy")
                    .op(b")Ruu");
            }),
            "model.w",
            "torch._utils._rebuild_device_tensor_from_numpy",
        ),
    ];
    for (name, pkl, key, global) in cases {
        let file = format!("{name}.pth");
        let err = refused(&file, &torch_zip(pkl, &[]), MIB);
        match &err {
            BackboneError::ForbiddenGlobal {
                key: k, global: g, ..
            } => {
                assert_eq!((k.as_str(), g.as_str()), (key, global), "{name}")
            }
            other => panic!("{name}: expected ForbiddenGlobal, got {other}"),
        }
    }

    // Named and dropped again (POP), or named before the pickle breaks: still refused.
    let dropped = pk(&|p| {
        p.op(b"}(")
            .str("model")
            .op(b"}u")
            .global("posix", "system")
            .op(b"0");
    });
    let err = refused("dropped.pth", &torch_zip(dropped, &[]), MIB);
    assert!(
        matches!(&err, BackboneError::ForbiddenGlobal { key, global, .. }
            if key.contains("dropped") && global == "posix.system"),
        "{err}"
    );
    let mut broken = Pickle::new();
    broken
        .op(b"}(")
        .str("model")
        .global("posix", "system")
        .str(cmd)
        .op(b"\x85R\xff");
    let err = refused("broken.pth", &torch_zip(broken.0.clone(), &[]), MIB);
    assert!(
        matches!(&err, BackboneError::ForbiddenGlobal { key, global, .. }
            if key.contains("data.pkl (byte") && global == "posix.system"),
        "{err}"
    );

    // The legacy format goes through the same reader.
    let mut p = Pickle::new();
    p.op(b"}(")
        .str("model")
        .global("posix", "system")
        .str(cmd)
        .op(b"\x85Ru");
    let err = refused("evil_legacy.pth", &legacy_file(p.stop(), &[]), MIB);
    assert!(
        matches!(&err, BackboneError::ForbiddenGlobal { key, global, .. }
            if key == "model" && global == "posix.system"),
        "{err}"
    );
}

#[test]
fn whitelisted_data_in_other_entries_is_skipped() {
    // A checkpoint whose scheduler holds a collections.Counter (torch's MultiStepLR does), a
    // set, a torch dtype and a float: read, only the model's tensor returned.
    let file = checkpoint_with(|p| {
        p.str("scheduler").op(b"}(").str("milestones");
        p.global("collections", "Counter").op(b"}(K\x05K\x01u\x85R");
        p.str("names").op(b"\x8f(").str("a").op(b"\x90");
        p.str("dtype").global("torch", "float32");
        p.str("gamma").op(b"G").op(&0.1f64.to_be_bytes());
        p.op(b"u")
            .str("iteration")
            .op(b"J")
            .op(&90000u32.to_le_bytes());
    });
    let sd = read("ok.pth", &file).unwrap();
    assert_eq!(sd.names(), ["w"]);
    assert_eq!(
        sd.get("w").unwrap().to_vec1::<f32>().unwrap(),
        [1., 2., 3., 4.]
    );
}

// --- Views that ask for more than their storage has.

#[test]
fn a_huge_zero_stride_view_of_one_element_is_refused_before_allocating() {
    for legacy in [false, true] {
        let mut p = Pickle::new();
        p.op(b"}(").str("w");
        p.zip_tensor("FloatStorage", "0", 1, 0, &[1 << 40], &[0]);
        p.op(b"u");
        let file = if legacy {
            legacy_file(p.stop(), &[("0", 1, f32_bytes(&[7.]))])
        } else {
            torch_zip(p.stop(), &[("0", f32_bytes(&[7.]))])
        };
        let err = refused("broadcast.pth", &file, MIB);
        match &err {
            BackboneError::BadTensor { key, detail, .. } => {
                assert_eq!(key, "w");
                assert!(
                    detail.contains("[1099511627776]") && detail.contains("more than twice"),
                    "{detail}"
                );
            }
            other => panic!("expected BadTensor, got {other}"),
        }
    }
}

#[test]
fn many_views_of_one_storage_are_refused() {
    // 40 full views of one 64 KiB storage would be 2.5 MiB from a 70 KiB file.
    let numel = 16 * 1024;
    let mut p = Pickle::new();
    p.op(b"}(");
    for i in 0..40 {
        p.str(&format!("w{i}"));
        p.zip_tensor("FloatStorage", "0", numel, 0, &[numel], &[1]);
    }
    p.op(b"u");
    let file = torch_zip(p.stop(), &[("0", vec![0u8; numel as usize * 4])]);
    let err = refused("aliases.pth", &file, 2 * MIB);
    assert!(
        matches!(&err, BackboneError::BadTensor { detail, .. } if detail.contains("more than twice")),
        "{err}"
    );
    // Two views (a weight and its transpose, tied weights) are fine.
    let mut p = Pickle::new();
    p.op(b"}(").str("a");
    p.zip_tensor("FloatStorage", "0", 4, 0, &[2, 2], &[2, 1]);
    p.str("a_t");
    p.zip_tensor("FloatStorage", "0", 4, 0, &[2, 2], &[1, 2]);
    p.op(b"u");
    let sd = read(
        "tied.pth",
        &torch_zip(p.stop(), &[("0", f32_bytes(&[1., 2., 3., 4.]))]),
    )
    .unwrap();
    assert_eq!(
        sd.get("a_t").unwrap().to_vec2::<f32>().unwrap(),
        [[1., 3.], [2., 4.]]
    );
}

#[test]
fn sizes_strides_and_offsets_that_overflow_are_refused() {
    let cases: [(&str, i64, &[i64], &[i64], &str); 7] = [
        (
            "product",
            0,
            &[1 << 32, 1 << 32, 1 << 32],
            &[1, 1, 1],
            "more elements than fit in 64 bits",
        ),
        (
            "bytes",
            0,
            &[1 << 62],
            &[0],
            "more bytes than fit in 64 bits",
        ),
        (
            "stride",
            0,
            &[2, 2],
            &[1 << 62, 1 << 62],
            "reaches past its storage",
        ),
        ("offset", 1 << 62, &[1], &[1], "reaches past its storage"),
        (
            "offset_max",
            i64::MAX,
            &[2],
            &[i64::MAX],
            "reaches past its storage",
        ),
        (
            "negative_size",
            0,
            &[-1],
            &[1],
            "not a non-negative integer",
        ),
        (
            "negative_stride",
            0,
            &[2],
            &[-1],
            "not a non-negative integer",
        ),
    ];
    for (name, offset, size, stride, expect) in cases {
        let file = model_with(|p| {
            p.zip_tensor("FloatStorage", "0", 4, offset, size, stride);
        });
        let err = refused(&format!("{name}.pth"), &file, MIB);
        match &err {
            BackboneError::BadTensor { key, detail, .. } => {
                assert_eq!(key, "w", "{name}");
                assert!(detail.contains(expect), "{name}: {detail}");
            }
            other => panic!("{name}: expected BadTensor, got {other}"),
        }
    }
    // The last element exactly at the storage's end is fine; one further is not.
    let ok = model_with(|p| {
        p.zip_tensor("FloatStorage", "0", 4, 1, &[3], &[1]);
    });
    assert_eq!(
        read("edge.pth", &ok)
            .unwrap()
            .get("w")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        [2., 3., 4.]
    );
    let past = model_with(|p| {
        p.zip_tensor("FloatStorage", "0", 4, 2, &[3], &[1]);
    });
    refused("past.pth", &past, MIB);
}

// --- Length fields larger than the file.

#[test]
fn length_fields_beyond_the_file_are_refused_without_allocating() {
    let pickles: [(&str, Vec<u8>); 7] = [
        (
            "binunicode_4gib",
            b"\x80\x02}(X\xff\xff\xff\xffmodel".to_vec(),
        ),
        (
            "binunicode8",
            [&b"\x80\x04}(\x8d"[..], &u64::MAX.to_le_bytes(), b"x"].concat(),
        ),
        (
            "binbytes8",
            [&b"\x80\x04}(\x8e"[..], &(1u64 << 40).to_le_bytes(), b"x"].concat(),
        ),
        ("long4", b"\x80\x02}(\x8b\xff\xff\xff\x7f\x00".to_vec()),
        (
            "binstring_negative",
            b"\x80\x02}(T\xff\xff\xff\xffab".to_vec(),
        ),
        ("short_binunicode", b"\x80\x04}(\x8c\xc8abc".to_vec()),
        (
            "text_line",
            [&b"\x80\x02}(cmodule\n"[..], &vec![b'a'; 100_000]].concat(),
        ),
    ];
    for (name, pkl) in pickles {
        for legacy in [false, true] {
            let file = if legacy {
                legacy_file(pkl.clone(), &[])
            } else {
                torch_zip(pkl.clone(), &[])
            };
            let err = refused(&format!("{name}.pth"), &file, 2 * MIB);
            assert!(
                matches!(&err, BackboneError::Corrupt { detail, .. }
                    if detail.contains("left") || detail.contains("longer than") || detail.contains("negative length")),
                "{name}: {err}"
            );
        }
    }
}

// --- Memo references: shared, never copied; nesting bounded.

#[test]
fn memo_bombs_are_quick_and_bounded() {
    // Deep: 100,000 levels of (x, x) from one memo slot, in the optimizer.
    let deep = checkpoint_with(|p| {
        p.str("optimizer").op(b"]q\x000");
        for _ in 0..100_000 {
            p.op(b"h\x00h\x00\x86q\x000");
        }
        p.op(b"h\x00");
    });
    let t = Instant::now();
    let err = refused("deep_bomb.pth", &deep, 64 * MIB);
    assert!(
        matches!(&err, BackboneError::Corrupt { detail, .. } if detail.contains("nested more than")),
        "{err}"
    );
    // Wide and shallow: 90 levels, 2^90 paths if copied, one node per level when shared.
    let wide = checkpoint_with(|p| {
        p.str("optimizer").op(b"]q\x000");
        for _ in 0..90 {
            p.op(b"h\x00h\x00\x86q\x000");
        }
        p.op(b"h\x00");
        // And a list that holds itself.
        p.str("cycle").op(b"]q\x01h\x01a");
    });
    let (r, peak) = measure(|| read("wide_bomb.pth", &wide));
    assert_eq!(r.unwrap().names(), ["w"]);
    assert!(peak < MIB, "{peak} bytes");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn object_bombs_stop_at_the_object_limit() {
    // 3 MB of one-byte opcodes that each build an empty list: about 200 MB of objects if
    // built, refused at the limit (64 MiB + 16 bytes per byte of pickle).
    let mut pkl = b"\x80\x02".to_vec();
    pkl.extend(std::iter::repeat_n(b']', 3 << 20));
    pkl.push(b'.');
    let t = Instant::now();
    let err = refused("lists.pth", &torch_zip(pkl, &[]), 200 * MIB);
    assert!(
        matches!(&err, BackboneError::Corrupt { detail, .. } if detail.contains("MiB of objects")),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

// --- Malformed tensor descriptions: errors, never panics.

#[test]
fn malformed_rebuild_calls_are_errors_not_panics() {
    type Writer = Box<dyn Fn(&mut Pickle)>;
    let rebuild = |p: &mut Pickle| {
        p.global("torch._utils", "_rebuild_tensor_v2");
    };
    let storage = |p: &mut Pickle, parts: &dyn Fn(&mut Pickle)| {
        p.op(b"(");
        parts(p);
        p.op(b"tQ");
    };
    let good_id = |p: &mut Pickle| {
        p.str("storage")
            .global("torch", "FloatStorage")
            .str("0")
            .str("cpu")
            .op(b"K\x04");
    };
    let cases: Vec<(&str, Writer)> = vec![
        (
            "no_args",
            Box::new(move |p| {
                rebuild(p);
                p.op(b")R");
            }),
        ),
        (
            "two_args",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"K\x01K\x02\x86R");
            }),
        ),
        (
            "args_not_a_tuple",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"]R");
            }),
        ),
        (
            "storage_not_a_pid",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(")
                    .str("storage")
                    .op(b"K\x00(K\x04t(K\x01t\x89)t")
                    .op(b"R");
            }),
        ),
        (
            "pid_too_short",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &|p| {
                    p.str("storage").op(b"K\x01");
                });
                p.op(b"K\x00(K\x04t(K\x01ttR");
            }),
        ),
        (
            "pid_kind",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &|p| {
                    p.str("module")
                        .global("torch", "FloatStorage")
                        .str("0")
                        .str("cpu")
                        .op(b"K\x04");
                });
                p.op(b"K\x00(K\x04t(K\x01ttR");
            }),
        ),
        (
            "storage_class_is_a_dict",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &|p| {
                    p.str("storage")
                        .global("collections", "OrderedDict")
                        .str("0")
                        .str("cpu")
                        .op(b"K\x04");
                });
                p.op(b"K\x00(K\x04t(K\x01ttR");
            }),
        ),
        (
            "key_not_a_string",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &|p| {
                    p.str("storage")
                        .global("torch", "FloatStorage")
                        .op(b"K\x00")
                        .str("cpu")
                        .op(b"K\x04");
                });
                p.op(b"K\x00(K\x04t(K\x01ttR");
            }),
        ),
        (
            "size_not_a_tuple",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &good_id);
                p.op(b"K\x00K\x04(K\x01ttR");
            }),
        ),
        (
            "rank_mismatch",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &good_id);
                p.op(b"K\x00(K\x02K\x02t(K\x01ttR");
            }),
        ),
        (
            "float_size",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &good_id);
                p.op(b"K\x00(G").op(&4f64.to_be_bytes()).op(b"t(K\x01ttR");
            }),
        ),
        (
            "offset_none",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &good_id);
                p.op(b"N(K\x04t(K\x01ttR");
            }),
        ),
        (
            "rank_65",
            Box::new(move |p| {
                rebuild(p);
                p.op(b"(");
                storage(p, &good_id);
                p.op(b"K\x00(");
                for _ in 0..65 {
                    p.op(b"K\x01");
                }
                p.op(b"t(");
                for _ in 0..65 {
                    p.op(b"K\x01");
                }
                p.op(b"ttR");
            }),
        ),
        (
            "parameter_of_an_int",
            Box::new(|p| {
                p.global("torch._utils", "_rebuild_parameter")
                    .op(b"(K\x01\x89)tR");
            }),
        ),
        (
            "ordered_dict_with_args",
            Box::new(|p| {
                p.global("collections", "OrderedDict").op(b"(K\x01tR");
            }),
        ),
        (
            "storage_type_called",
            Box::new(|p| {
                p.global("torch", "FloatStorage").op(b"(K\x01tR");
            }),
        ),
        (
            "reduce_on_an_int",
            Box::new(|p| {
                p.op(b"K\x01)R");
            }),
        ),
        (
            "pops_empty",
            Box::new(|p| {
                p.op(b"0000");
            }),
        ),
        (
            "mark_missing",
            Box::new(|p| {
                p.op(b"uuu");
            }),
        ),
        (
            "unknown_memo",
            Box::new(|p| {
                p.op(b"h\x09");
            }),
        ),
        (
            "unknown_opcode",
            Box::new(|p| {
                p.op(b"\xff");
            }),
        ),
    ];
    for (name, w) in cases {
        let file = model_with(|p| w(p));
        let r = std::panic::catch_unwind(|| read(&format!("{name}.pth"), &file));
        let err = match r {
            Err(_) => panic!("{name}: panicked"),
            Ok(Ok(_)) => panic!("{name}: accepted"),
            Ok(Err(e)) => e,
        };
        assert!(
            matches!(
                err,
                BackboneError::BadTensor { .. } | BackboneError::Corrupt { .. }
            ),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("{name}.pth")), "{msg}");
        if let BackboneError::BadTensor { key, .. } = &err {
            // The tensor's name in the state dict, or its path in the checkpoint.
            assert!(key == "w" || key == "model.w", "{name}: {msg}");
        }
    }
}

// --- Storages that do not hold what the pickle claims.

#[test]
fn storages_smaller_or_larger_than_claimed_are_refused() {
    let mut p = Pickle::new();
    p.op(b"}(").str("w");
    p.zip_tensor("FloatStorage", "0", 4, 0, &[4], &[1]);
    p.op(b"u");
    let pkl = p.stop();
    for (name, data) in [
        ("small", f32_bytes(&[1., 2., 3.])),
        ("large", f32_bytes(&[1., 2., 3., 4., 5.])),
    ] {
        let err = refused(
            &format!("{name}.pth"),
            &torch_zip(pkl.clone(), &[("0", data.clone())]),
            MIB,
        );
        match &err {
            BackboneError::BadTensor { key, detail, .. } => {
                assert_eq!(key, "w");
                assert!(
                    detail.contains(&format!("has {} bytes", data.len()))
                        && detail.contains("(16 bytes)"),
                    "{detail}"
                );
            }
            other => panic!("{name}: expected BadTensor, got {other}"),
        }
    }
    let err = refused("missing.pth", &torch_zip(pkl.clone(), &[]), MIB);
    assert!(
        matches!(&err, BackboneError::BadTensor { detail, .. } if detail.contains("missing")),
        "{err}"
    );

    // Legacy: the data's own element count disagrees, or the data is cut short.
    let legacy = |numel: i64, data: Vec<u8>| legacy_file(pkl.clone(), &[("0", numel, data)]);
    let err = refused("count.pth", &legacy(3, f32_bytes(&[1., 2., 3.])), MIB);
    assert!(
        matches!(&err, BackboneError::Corrupt { detail, .. } if detail.contains("holds 3 elements")),
        "{err}"
    );
    let err = refused("short.pth", &legacy(4, f32_bytes(&[1., 2., 3.])), MIB);
    assert!(
        matches!(&err, BackboneError::Corrupt { detail, .. } if detail.contains("file ends inside storage")),
        "{err}"
    );
    assert_eq!(
        read("right.pth", &legacy(4, f32_bytes(&[1., 2., 3., 4.])))
            .unwrap()
            .get("w")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        [1., 2., 3., 4.]
    );
}

// --- The zip container.

#[test]
fn hostile_zip_containers_are_refused() {
    let mut p = Pickle::new();
    p.op(b"}(").str("w");
    p.zip_tensor("FloatStorage", "0", 4, 0, &[4], &[1]);
    p.op(b"u");
    let pkl = p.stop();
    let data = f32_bytes(&[1., 2., 3., 4.]);
    let good = torch_zip(pkl.clone(), &[("0", data.clone())]);
    let eocd = good.len() - 22;

    // The end record claims 65535 entries in a small directory.
    let mut many = good.clone();
    many[eocd + 8..eocd + 12].copy_from_slice(&[0xff; 4]);
    let err = refused("many.pth", &many, MIB);
    assert!(err.to_string().contains("claims 65535 entries"), "{err}");
    // The directory lies outside the file.
    let mut outside = good.clone();
    outside[eocd + 16..eocd + 20].copy_from_slice(&0xffff_0000u32.to_le_bytes());
    refused("outside.pth", &outside, MIB);
    // A zip64 locator pointing past the end.
    let mut z64 = good[..eocd].to_vec();
    z64.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    z64.extend_from_slice(&[0; 4]);
    z64.extend_from_slice(&u64::MAX.to_le_bytes());
    z64.extend_from_slice(&1u32.to_le_bytes());
    z64.extend_from_slice(&good[eocd..]);
    let err = refused("zip64.pth", &z64, MIB);
    assert!(err.to_string().contains("outside the file"), "{err}");
    // A storage member whose CRC does not match (a flipped bit in the data).
    let at = good
        .windows(data.len())
        .position(|w| w == &data[..])
        .unwrap();
    let mut flipped = good.clone();
    flipped[at + 5] ^= 0x10;
    let err = refused("crc.pth", &flipped, MIB);
    assert!(err.to_string().contains("CRC-32"), "{err}");
    // Two data.pkl, big-endian data.
    let two = zip_file(&[
        Member::stored("a/data.pkl", pkl.clone()),
        Member::stored("b/data.pkl", pkl.clone()),
    ]);
    assert!(refused("two.pth", &two, MIB)
        .to_string()
        .contains("2 `data.pkl`"));
    let big = zip_file(&[
        Member::stored("a/data.pkl", pkl.clone()),
        Member::stored("a/byteorder", b"big".to_vec()),
        Member::stored("a/data/0", data.clone()),
    ]);
    assert!(refused("big.pth", &big, MIB)
        .to_string()
        .contains("byte order `big`"));

    // Deflated members are read when honest...
    let deflated = zip_file(&[
        Member {
            deflate: true,
            ..Member::stored("a/data.pkl", pkl.clone())
        },
        Member {
            deflate: true,
            ..Member::stored("a/data/0", data.clone())
        },
    ]);
    assert_eq!(
        read("deflated.pth", &deflated)
            .unwrap()
            .get("w")
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        [1., 2., 3., 4.]
    );
    // ...and refused when they inflate to more than declared, or declare more than deflate can
    // give from their size.
    let mut p = Pickle::new();
    p.op(b"}(").str("w");
    p.zip_tensor("ByteStorage", "0", 100, 0, &[100], &[1]);
    p.op(b"u");
    let pkl100 = p.stop();
    let more = zip_file(&[
        Member::stored("a/data.pkl", pkl100.clone()),
        Member {
            deflate: true,
            declared: Some(100),
            ..Member::stored("a/data/0", vec![0u8; 1 << 20])
        },
    ]);
    let err = refused("inflates.pth", &more, 2 * MIB);
    assert!(
        err.to_string().contains("inflates to 101 or more bytes"),
        "{err}"
    );
    let mut p = Pickle::new();
    p.op(b"}(").str("w");
    p.zip_tensor("ByteStorage", "0", 1 << 30, 0, &[1 << 30], &[1]);
    p.op(b"u");
    let bomb = zip_file(&[
        Member::stored("a/data.pkl", p.stop()),
        Member {
            deflate: true,
            declared: Some(1 << 30),
            ..Member::stored("a/data/0", vec![0u8; 1000])
        },
    ]);
    let err = refused("ratio.pth", &bomb, MIB);
    assert!(err.to_string().contains("maximum ratio"), "{err}");
}

// --- Truncation and random bytes.

#[test]
fn every_truncation_is_a_clean_error() {
    let official = std::fs::read(fixture("official_checkpoint_partial.pth")).unwrap();
    let legacy = legacy_fixture_bytes();
    for (name, bytes, step) in [
        ("official.pth", &official, official.len() / 97),
        ("legacy.pth", &legacy, 1),
    ] {
        for keep in (0..bytes.len()).step_by(step) {
            let r = std::panic::catch_unwind(|| read(name, &bytes[..keep]));
            match r {
                Err(_) => panic!("{name} cut at {keep}: panicked"),
                Ok(Ok(_)) => panic!("{name} cut at {keep}: accepted"),
                Ok(Err(e)) => assert!(e.to_string().contains(name), "{e}"),
            }
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_bytes_are_clean_errors() {
    let mut rng = Rng(13);
    let prefixes: [&[u8]; 5] = [
        b"",
        b"PK\x03\x04",
        &common::legacy_header(),
        b"\x20\x00\x00\x00\x00\x00\x00\x00{",
        b"\x80\x02",
    ];
    for case in 0..400 {
        let mut bytes = prefixes[case % prefixes.len()].to_vec();
        let n = rng.below(4096);
        bytes.extend(rng.bytes(n));
        let (r, peak) = measure(|| std::panic::catch_unwind(|| read("random.pth", &bytes)));
        match r {
            Err(_) => panic!("case {case}: panicked"),
            Ok(Ok(sd)) => assert!(sd.is_empty() || n > 0, "case {case}"),
            Ok(Err(e)) => assert!(e.to_string().contains("random.pth"), "{e}"),
        }
        assert!(peak < 4 * MIB, "case {case}: {peak} bytes");
    }
}

// --- Seeded mini-fuzz of the valid fixtures.

/// Big values written over length and shape fields.
const BIG: [u64; 6] = [
    u64::MAX,
    1 << 40,
    0xffff_ffff,
    0x7fff_ffff,
    0x8000_0000,
    1 << 62,
];

/// One mutation of `b`: bit flips, truncation, big values over 1, 2, 4 or 8 bytes, a pickle
/// integer argument inflated, or a chunk spliced in from elsewhere (copied over or inserted).
fn mutate(rng: &mut Rng, b: &[u8]) -> (String, Vec<u8>) {
    let mut m = b.to_vec();
    if m.is_empty() {
        return ("empty".into(), m);
    }
    match rng.below(6) {
        0 => {
            let n = 1 + rng.below(8);
            for _ in 0..n {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
            (format!("flip {n} bits"), m)
        }
        1 => {
            let keep = rng.below(m.len());
            m.truncate(keep);
            (format!("truncate to {keep}"), m)
        }
        2 => {
            let width = [1, 2, 4, 8][rng.below(4)];
            let i = rng.below(m.len().saturating_sub(width) + 1);
            let v = BIG[rng.below(BIG.len())].to_le_bytes();
            let end = (i + width).min(m.len());
            m[i..end].copy_from_slice(&v[..end - i]);
            (format!("{width} big bytes at {i}"), m)
        }
        3 => {
            // A pickle integer (K, M, J) argument or a string length (X) made huge.
            let ops: Vec<usize> = (0..m.len())
                .filter(|&i| matches!(m[i], b'K' | b'M' | b'J' | b'X'))
                .collect();
            if ops.is_empty() {
                return ("no field".into(), m);
            }
            let i = ops[rng.below(ops.len())];
            let width = match m[i] {
                b'K' => 1,
                b'M' => 2,
                _ => 4,
            };
            for k in 1..=width {
                if let Some(x) = m.get_mut(i + k) {
                    *x = 0xff;
                }
            }
            (format!("field at {i} inflated"), m)
        }
        4 => {
            let len = 1 + rng.below(64.min(m.len()));
            let from = rng.below(m.len() - len + 1);
            let to = rng.below(m.len() - len + 1);
            let chunk = m[from..from + len].to_vec();
            m[to..to + len].copy_from_slice(&chunk);
            (format!("{len} bytes from {from} over {to}"), m)
        }
        _ => {
            let len = 1 + rng.below(64.min(m.len()));
            let from = rng.below(m.len() - len + 1);
            let to = rng.below(m.len());
            let chunk = m[from..from + len].to_vec();
            m.splice(to..to, chunk);
            (format!("{len} bytes from {from} inserted at {to}"), m)
        }
    }
}

#[test]
fn seeded_mini_fuzz_of_the_valid_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("own.safetensors");
    StateDict::read(fixture("torchvision_resnet50_partial.pth"), &Device::Cpu)
        .unwrap()
        .save_safetensors(&own, "")
        .unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "torchvision.pth",
            std::fs::read(fixture("torchvision_resnet50_partial.pth")).unwrap(),
        ),
        (
            "official.pth",
            std::fs::read(fixture("official_checkpoint_partial.pth")).unwrap(),
        ),
        ("legacy.pth", legacy_fixture_bytes()),
        ("own.safetensors", std::fs::read(&own).unwrap()),
    ];
    // Cases per file and mode: 400 by default (about a second); `MMFORMER_FUZZ_CASES` and
    // `MMFORMER_FUZZ_SEED` run a longer or different campaign.
    let per_mode: usize = std::env::var("MMFORMER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seed: u64 = std::env::var("MMFORMER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2024);
    let t = Instant::now();
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let (mut cases, mut accepted, mut max_peak) = (0, 0, 0);
    let mut run = |name: &str, what: String, bytes: &[u8], max_peak: &mut usize| {
        let limit = 64 * MIB;
        let (r, peak) = measure(|| std::panic::catch_unwind(|| read(name, bytes)));
        *max_peak = (*max_peak).max(peak);
        match r {
            Err(_) => failures.push(format!("{name}, {what}: panicked")),
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(e)) => {
                let msg = e.to_string();
                if !msg.contains(name) || msg.contains('\n') {
                    failures.push(format!("{name}, {what}: unclear error {msg}"));
                }
            }
        }
        if peak > limit {
            failures.push(format!("{name}, {what}: {peak} bytes allocated"));
        }
        cases += 1;
    };
    for (name, bytes) in &files {
        // The file as a whole (container fields, data, everything).
        for _ in 0..per_mode {
            let (what, m) = mutate(&mut rng, bytes);
            run(name, what, &m, &mut max_peak);
        }
        // Zip files: the pickle and a storage mutated inside a valid container (fresh CRCs),
        // so that the mutations reach the pickle reader and the tensor checks.
        if bytes.starts_with(b"PK") {
            let members = unzip(bytes);
            let pkl = members
                .iter()
                .position(|(n, _)| n.ends_with("data.pkl"))
                .unwrap();
            for case in 0..per_mode {
                let target = if case % 5 == 4 {
                    1 + rng.below(members.len() - 1)
                } else {
                    pkl
                };
                let (what, m) = mutate(&mut rng, &members[target].1);
                let rebuilt = zip_file(
                    &members
                        .iter()
                        .enumerate()
                        .map(|(i, (n, d))| {
                            Member::stored(
                                n.clone(),
                                if i == target { m.clone() } else { d.clone() },
                            )
                        })
                        .collect::<Vec<_>>(),
                );
                run(
                    name,
                    format!("{} {what}", members[target].0),
                    &rebuilt,
                    &mut max_peak,
                );
            }
        }
    }
    println!(
        "seed {seed}: {cases} cases in {:.1} s: {accepted} read, {} refused cleanly, peak allocation {:.1} MiB, {} failures",
        t.elapsed().as_secs_f64(),
        cases - accepted - failures.len(),
        max_peak as f64 / MIB as f64,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(cases >= 6 * per_mode);
}
