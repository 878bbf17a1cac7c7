"""Independent reference for EfficientNet-Lite0 (efficientnet_pytorch Lite layout) in pure
Python (float64, no torch / numpy): reads the legacy .pth with the standard pickle module,
runs the network UNFOLDED (conv, then batch norm with eps 1e-3, then ReLU6) with TF "SAME"
padding (extra row / column at the bottom / right), and writes the logits and the sums of the
four feature taps for a deterministic 64x96 input to lite0_reference_64x96.txt.

Usage: python3 lite0_reference.py <efficientnet-lite0-57934424.pth>   (about a minute)
"""
import collections, itertools, math, pickle, struct, sys, os

H, W = 64, 96

def load(path):
    f = open(path, 'rb')
    for _ in range(3):
        pickle.load(f)
    class Storage:
        def __init__(self, cls, key, numel):
            self.cls, self.key, self.numel = cls, key, numel
    class Unpickler(pickle.Unpickler):
        def find_class(self, mod, name):
            if (mod, name) == ('torch._utils', '_rebuild_tensor_v2'):
                return lambda st, off, size, stride, *a: (st, off, size, stride)
            if mod == 'torch':
                return name
            if (mod, name) == ('collections', 'OrderedDict'):
                return collections.OrderedDict
            raise pickle.UnpicklingError((mod, name))
        def persistent_load(self, pid):
            return Storage(pid[1], pid[2], pid[4])
    sd = Unpickler(f).load()
    keys = pickle.load(f)
    by_key = {v[0].key: v[0] for v in sd.values()}
    data = {}
    for k in keys:
        n = struct.unpack('<q', f.read(8))[0]
        fmt, size = {'FloatStorage': ('f', 4), 'LongStorage': ('q', 8)}[by_key[k].cls]
        data[k] = struct.unpack('<%d%s' % (n, fmt), f.read(n * size))
    out = {}
    for name, (st, off, size, stride) in sd.items():
        if name.endswith('num_batches_tracked'):
            continue
        flat = [data[st.key][off + sum(i * s for i, s in zip(idx, stride))]
                for idx in itertools.product(*[range(s) for s in size])]
        out[name] = (list(size), flat)
    return out

def conv(x, c, h, w, weight, k, stride, groups):
    """x: list of c planes (lists h*w). TF SAME padding. Returns (planes, ho, wo)."""
    (cout, cin_g, _, _), wt = weight
    ho, wo = -(-h // stride), -(-w // stride)
    ph = max((ho - 1) * stride + k - h, 0)
    pw = max((wo - 1) * stride + k - w, 0)
    top, left = ph // 2, pw // 2
    cout_g = cout // groups
    out = []
    for o in range(cout):
        g = o // cout_g
        acc = [0.0] * (ho * wo)
        for i in range(cin_g):
            plane = x[g * cin_g + i]
            for ky in range(k):
                for kx in range(k):
                    wv = wt[((o * cin_g + i) * k + ky) * k + kx]
                    if wv == 0.0:
                        continue
                    for oy in range(ho):
                        iy = oy * stride + ky - top
                        if iy < 0 or iy >= h:
                            continue
                        row = iy * w
                        base = oy * wo
                        for ox in range(wo):
                            ix = ox * stride + kx - left
                            if 0 <= ix < w:
                                acc[base + ox] += wv * plane[row + ix]
        out.append(acc)
    return out, ho, wo

def conv1x1(x, weight):
    (cout, cin, _, _), wt = weight
    n = len(x[0])
    cols = list(zip(*x))
    return [[sum(a * b for a, b in zip(wt[o * cin:(o + 1) * cin], col)) for col in cols] for o in range(cout)]

def bn(x, sd, name, act):
    g, b, m, v = (sd[name + '.' + p][1] for p in ('weight', 'bias', 'running_mean', 'running_var'))
    out = []
    for c, plane in enumerate(x):
        s = g[c] / math.sqrt(v[c] + 1e-3)
        y = [(p - m[c]) * s + b[c] for p in plane]
        out.append([min(max(t, 0.0), 6.0) for t in y] if act else y)
    return out

def main():
    sd = load(sys.argv[1])
    x = [[((c * 7 + y * 3 + xx * 5) % 17) / 8.0 - 1.0 for y in range(H) for xx in range(W)] for c in range(3)]
    h, w = H, W
    x, h, w = conv(x, 3, h, w, sd['_conv_stem.weight'], 3, 2, 1)
    x = bn(x, sd, '_bn0', True)
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    cin, i, taps = 32, 0, []
    for e, k, s, cout, r in stages:
        for j in range(r):
            stride = s if j == 0 else 1
            p = '_blocks.%d.' % i
            inp = x
            if e != 1:
                x = bn(conv1x1(x, sd[p + '_expand_conv.weight']), sd, p + '_bn0', True)
            x, h, w = conv(x, len(x), h, w, sd[p + '_depthwise_conv.weight'], k, stride, len(x))
            x = bn(x, sd, p + '_bn1', True)
            x = bn(conv1x1(x, sd[p + '_project_conv.weight']), sd, p + '_bn2', False)
            if stride == 1 and cin == cout:
                x = [[a + b for a, b in zip(pa, pb)] for pa, pb in zip(x, inp)]
            if i in (2, 4, 10, 15):
                taps.append((i, len(x), h, w, sum(map(sum, x)), sum(t * t for pl in x for t in pl)))
            cin, i = cout, i + 1
        print('stage done', i, file=sys.stderr)
    x = bn(conv1x1(x, sd['_conv_head.weight']), sd, '_bn1', True)
    pooled = [sum(pl) / len(pl) for pl in x]
    (nc, nf), fw = sd['_fc.weight']
    fb = sd['_fc.bias'][1]
    logits = [sum(a * b for a, b in zip(fw[o * nf:(o + 1) * nf], pooled)) + fb[o] for o in range(nc)]
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'lite0_reference_64x96.txt'), 'w') as f:
        f.write('# EfficientNet-Lite0, input x[c,y,x] = ((7c + 3y + 5x) mod 17) / 8 - 1, 1x3x64x96; written by lite0_reference.py\n')
        for t in taps:
            f.write('tap %d %d %d %d %.17g %.17g\n' % t)
        for o, v in enumerate(logits):
            f.write('logit %d %.17g\n' % (o, v))

main()
