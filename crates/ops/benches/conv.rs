//! ResNet-50 (torchvision bottleneck, stride on the 3x3) and EfficientNet-Lite0 at 480x480,
//! random weights, BN treated as folded (every conv has a bias):
//!
//! - `resnet50_conv_stack/{ours,candle}`: the 53 convolutions alone, each on an input of its real
//!   shape, with bias + ReLU (+ residual where the block has one); candle = stock `conv2d` plus
//!   broadcast bias, add and relu.
//! - `resnet50_forward/ours`: the whole features-through-layer4 forward from `FrozenConv2d` and a
//!   3x3/2 max-pool, i.e. what the backbone will cost.
//! - `efficientnet_lite0_forward/ours`: stem + 16 MBConv blocks (depthwise path included).
//!
//! `cargo bench -p ops --bench conv` (about a minute). With `CONV_BENCH_LAYERS=1` it first prints a
//! per-layer-shape table, ours vs candle, in ms.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ops::conv::{Activation, ConvSpec, FrozenConv2d};

const SIZE: usize = 480;

fn rand(shape: &[usize], scale: f64) -> Tensor {
    Tensor::rand(-scale as f32, scale as f32, shape, &Device::Cpu).unwrap()
}

/// A conv with He-scaled uniform weights (keeps activations in a normal range: denormals or
/// overflow would distort the timings) and a small bias.
struct Layer {
    conv: FrozenConv2d,
    w: Tensor,
    b: Tensor,
    spec: ConvSpec,
}

impl Layer {
    fn new(cin: usize, cout: usize, k: usize, spec: ConvSpec) -> Self {
        let fan_in = cin / spec.groups * k * k;
        let w = rand(
            &[cout, cin / spec.groups, k, k],
            (6.0 / fan_in as f64).sqrt(),
        );
        let b = rand(&[cout], 0.1);
        Self {
            conv: FrozenConv2d::new(w.clone(), Some(b.clone()), spec).unwrap(),
            w,
            b,
            spec,
        }
    }

    fn ours(&self, x: &Tensor, act: Activation, res: Option<&Tensor>) -> Tensor {
        self.conv.forward(x, act, res).unwrap()
    }

    /// Stock candle: conv2d (symmetric padding only, which is all ResNet uses), bias, add, relu.
    fn candle(&self, x: &Tensor, act: Activation, res: Option<&Tensor>) -> Tensor {
        let s = self.spec;
        let y = x
            .conv2d(&self.w, s.padding[0], s.stride.0, s.dilation.0, s.groups)
            .unwrap();
        let mut y = y
            .broadcast_add(&self.b.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        if let Some(r) = res {
            y = (y + r).unwrap();
        }
        match act {
            Activation::None => y,
            Activation::Relu => y.relu().unwrap(),
            Activation::Relu6 => y.clamp(0f32, 6f32).unwrap(),
        }
    }
}

struct Bottleneck {
    conv1: Layer,
    conv2: Layer,
    conv3: Layer,
    down: Option<Layer>,
}

struct ResNet50 {
    stem: Layer,
    blocks: Vec<Bottleneck>,
}

impl ResNet50 {
    fn new() -> Self {
        let stem = Layer::new(3, 64, 7, ConvSpec::same_as_torch(2, 3));
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (width, n, stride) in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)] {
            for i in 0..n {
                let s = if i == 0 { stride } else { 1 };
                let cout = width * 4;
                blocks.push(Bottleneck {
                    conv1: Layer::new(cin, width, 1, ConvSpec::same_as_torch(1, 0)),
                    conv2: Layer::new(width, width, 3, ConvSpec::same_as_torch(s, 1)),
                    conv3: Layer::new(width, cout, 1, ConvSpec::same_as_torch(1, 0)),
                    down: (i == 0).then(|| Layer::new(cin, cout, 1, ConvSpec::same_as_torch(s, 0))),
                });
                cin = cout;
            }
        }
        Self { stem, blocks }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.stem.ours(x, Activation::Relu, None);
        let mut y = ops::conv::max_pool2d(&y, 3, 2, 1).unwrap();
        for b in &self.blocks {
            let identity = match &b.down {
                Some(d) => d.ours(&y, Activation::None, None),
                None => y.clone(),
            };
            let t = b.conv1.ours(&y, Activation::Relu, None);
            let t = b.conv2.ours(&t, Activation::Relu, None);
            y = b.conv3.ours(&t, Activation::Relu, Some(&identity));
        }
        y
    }

    /// Every conv with its real input shape, activation and residual, as (layer, x, act, res).
    fn conv_stack(&self) -> Vec<(&Layer, Tensor, Activation, Option<Tensor>)> {
        let mut out = vec![(
            &self.stem,
            rand(&[1, 3, SIZE, SIZE], 1.0),
            Activation::Relu,
            None,
        )];
        let mut hw = SIZE / 4;
        let mut cin = 64;
        for b in &self.blocks {
            let s = b.conv2.spec.stride.0;
            let width = b.conv1.w.dims()[0];
            let cout = width * 4;
            let ho = hw / s;
            out.push((
                &b.conv1,
                rand(&[1, cin, hw, hw], 1.0),
                Activation::Relu,
                None,
            ));
            out.push((
                &b.conv2,
                rand(&[1, width, hw, hw], 1.0),
                Activation::Relu,
                None,
            ));
            if let Some(d) = &b.down {
                out.push((d, rand(&[1, cin, hw, hw], 1.0), Activation::None, None));
            }
            out.push((
                &b.conv3,
                rand(&[1, width, ho, ho], 1.0),
                Activation::Relu,
                Some(rand(&[1, cout, ho, ho], 1.0)),
            ));
            hw = ho;
            cin = cout;
        }
        out
    }
}

struct MbConv {
    expand: Option<Layer>,
    dw: Layer,
    project: Layer,
    skip: bool,
}

/// EfficientNet-Lite0 features: (expand, kernel, stride, out channels, repeats) per stage.
struct Lite0 {
    stem: Layer,
    blocks: Vec<MbConv>,
}

impl Lite0 {
    fn new() -> Self {
        let mut hw = SIZE;
        let stem = Layer::new(3, 32, 3, ConvSpec::tf_same((hw, hw), (3, 3), 2, 1));
        hw = hw.div_ceil(2);
        let mut blocks = Vec::new();
        let mut cin = 32;
        let stages = [
            (1, 3, 1, 16, 1),
            (6, 3, 2, 24, 2),
            (6, 5, 2, 40, 2),
            (6, 3, 2, 80, 3),
            (6, 5, 1, 112, 3),
            (6, 5, 2, 192, 4),
            (6, 3, 1, 320, 1),
        ];
        for (e, k, stride, cout, n) in stages {
            for i in 0..n {
                let s = if i == 0 { stride } else { 1 };
                let mid = cin * e;
                blocks.push(MbConv {
                    expand: (e != 1)
                        .then(|| Layer::new(cin, mid, 1, ConvSpec::same_as_torch(1, 0))),
                    dw: Layer::new(
                        mid,
                        mid,
                        k,
                        ConvSpec::tf_same((hw, hw), (k, k), s, 1).with_groups(mid),
                    ),
                    project: Layer::new(mid, cout, 1, ConvSpec::same_as_torch(1, 0)),
                    skip: s == 1 && cin == cout,
                });
                hw = hw.div_ceil(s);
                cin = cout;
            }
        }
        Self { stem, blocks }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = self.stem.ours(x, Activation::Relu6, None);
        for b in &self.blocks {
            let t = match &b.expand {
                Some(e) => e.ours(&y, Activation::Relu6, None),
                None => y.clone(),
            };
            let t = b.dw.ours(&t, Activation::Relu6, None);
            y = b.project.ours(&t, Activation::None, b.skip.then_some(&y));
        }
        y
    }
}

/// CPU time of the whole process (all threads), in ms.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall writing into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

/// (wall, cpu) ms, each the minimum over `reps` runs after one warm-up. The machine is shared:
/// the minimum wall time is the least disturbed estimate, and CPU time (all threads) measures
/// the work itself, which other load barely changes.
fn time_ms(f: impl Fn(), reps: usize) -> (f64, f64) {
    f();
    (0..reps)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_ms());
            f();
            (t.elapsed().as_secs_f64() * 1e3, cpu_ms() - c)
        })
        .fold((f64::INFINITY, f64::INFINITY), |(a, b), (w, c)| {
            (a.min(w), b.min(c))
        })
}

impl Lite0 {
    /// Minimum wall ms over 5 forwards of each kind of layer, summed over the network.
    fn profile(&self, x: &Tensor) {
        let mut y = self.stem.ours(x, Activation::Relu6, None);
        let stem = time_ms(|| drop(self.stem.ours(x, Activation::Relu6, None)), 5).0;
        let (mut ex, mut dw, mut pr) = (0.0, 0.0, 0.0);
        for b in &self.blocks {
            let t = match &b.expand {
                Some(e) => {
                    ex += time_ms(|| drop(e.ours(&y, Activation::Relu6, None)), 5).0;
                    e.ours(&y, Activation::Relu6, None)
                }
                None => y.clone(),
            };
            dw += time_ms(|| drop(b.dw.ours(&t, Activation::Relu6, None)), 5).0;
            let t = b.dw.ours(&t, Activation::Relu6, None);
            let r = b.skip.then_some(&y);
            pr += time_ms(|| drop(b.project.ours(&t, Activation::None, r)), 5).0;
            y = b.project.ours(&t, Activation::None, r);
        }
        println!("efficientnet_lite0 layers (min wall ms): stem {stem:.1}, expand 1x1 {ex:.1}, depthwise {dw:.1}, project 1x1 {pr:.1}");
    }
}

/// Per-layer-shape table (each distinct shape once), printed before the criterion runs.
fn print_layers(net: &ResNet50, with_candle: bool) {
    let mut seen = std::collections::HashSet::new();
    let (mut tot_o, mut tot_cpu, mut tot_c) = (0.0, 0.0, 0.0);
    println!(
        "{:<44} {:>8} {:>8} {:>7} {:>9} {:>6}",
        "layer (Cin->Cout k s @ HxW) x count",
        "ours ms",
        "(cpu ms)",
        "GFLOP/s",
        "candle ms",
        "ratio"
    );
    let stack = net.conv_stack();
    for (l, x, act, r) in &stack {
        let d = l.w.dims();
        let key = (d.to_vec(), x.dims().to_vec(), l.spec, r.is_some());
        let count = stack
            .iter()
            .filter(|(l2, x2, _, r2)| {
                (
                    l2.w.dims().to_vec(),
                    x2.dims().to_vec(),
                    l2.spec,
                    r2.is_some(),
                ) == key
            })
            .count();
        if !seen.insert(key) {
            continue;
        }
        let (o, cpu) = time_ms(|| drop(l.ours(x, *act, r.as_ref())), 7);
        let c = if with_candle {
            time_ms(|| drop(l.candle(x, *act, r.as_ref())), 2).0
        } else {
            f64::NAN
        };
        let y = l.ours(x, *act, r.as_ref());
        let flops = 2.0 * (y.elem_count() * d[1] * d[2] * d[3]) as f64;
        tot_o += o * count as f64;
        tot_cpu += cpu * count as f64;
        tot_c += c * count as f64;
        let name = format!(
            "{}->{} {}x{} s{} @ {}x{} x{count}",
            d[1],
            d[0],
            d[2],
            d[3],
            l.spec.stride.0,
            x.dims()[2],
            x.dims()[3]
        );
        println!(
            "{name:<44} {o:>8.2} {cpu:>8.2} {:>7.1} {c:>9.2} {:>6.2}",
            flops / o / 1e6,
            c / o
        );
    }
    let x = rand(&[1, 64, SIZE / 2, SIZE / 2], 1.0);
    let (o, cpu) = time_ms(|| drop(ops::conv::max_pool2d(&x, 3, 2, 1).unwrap()), 7);
    println!(
        "{:<44} {o:>8.2} {cpu:>8.2}",
        "max_pool2d 3x3 s2 p1 @ 64x240x240"
    );
    println!(
        "{:<44} {tot_o:>8.1} {tot_cpu:>8.1} {:>7} {tot_c:>9.1} {:>6.2}",
        "total (weighted by count)",
        "",
        tot_c / tot_o
    );
}

fn benches(c: &mut Criterion) {
    let net = ResNet50::new();
    match std::env::var("CONV_BENCH_LAYERS").as_deref() {
        Ok("1") => print_layers(&net, true),
        Ok("ours") => print_layers(&net, false),
        Ok("lite") => Lite0::new().profile(&rand(&[1, 3, SIZE, SIZE], 1.0)),
        _ => {}
    }
    let x = rand(&[1, 3, SIZE, SIZE], 1.0);
    let lite = Lite0::new();
    if std::env::var("CONV_BENCH_LAYERS").is_ok() {
        let (w, cpu) = time_ms(|| drop(net.forward(&x)), 7);
        println!("resnet50 forward: {w:.1} ms wall, {cpu:.1} ms cpu (min of 7)");
        let (w, cpu) = time_ms(|| drop(lite.forward(&x)), 7);
        println!("efficientnet_lite0 forward: {w:.1} ms wall, {cpu:.1} ms cpu (min of 7)");
    }
    let stack = net.conv_stack();
    let mut g = c.benchmark_group("resnet50_conv_stack");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("ours", |b| {
        b.iter(|| {
            for (l, x, act, r) in &stack {
                drop(l.ours(x, *act, r.as_ref()));
            }
        })
    });
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("candle", |b| {
        b.iter(|| {
            for (l, x, act, r) in &stack {
                drop(l.candle(x, *act, r.as_ref()));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("resnet50_forward");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("ours", |b| b.iter(|| net.forward(&x)));
    g.finish();

    let mut g = c.benchmark_group("efficientnet_lite0_forward");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("ours", |b| b.iter(|| lite.forward(&x)));
    g.finish();
}

criterion_group!(conv_benches, benches);
criterion_main!(conv_benches);
