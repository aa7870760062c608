// The optimizer step over the whole flat parameter buffer, one thread per parameter.
// Skipped entirely when the step's loss or any gradient was not finite (flag in
// status[0], raised by softmax_ce and finite_check).
struct Opt {
    n: u32,
    // 0: SGD with momentum, 1: Adam, 2: AdamW with global-norm clipping.
    kind: u32,
    lr: f32,
    // SGD momentum, or Adam beta1.
    beta1: f32,
    beta2: f32,
    eps: f32,
    // Adam bias corrections 1 - beta^t.
    c1: f32,
    c2: f32,
    // AdamW: decoupled weight decay, and the largest global gradient norm (0: none).
    wd: f32,
    clip: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> o: Opt;
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> status: array<f32>;
// AdamW: the gradients' squared global norm in gnorm[0]; decay[i] is 1 where parameter
// i belongs to a tensor of two or more dimensions.
@group(0) @binding(6) var<storage, read> gnorm: array<f32>;
@group(0) @binding(7) var<storage, read> decay: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid.x;
    if (i >= o.n || status[0] != 0.0) { return; }
    var gi = g[i];
    var wi = w[i];
    if (o.kind == 2u) {
        let norm = sqrt(gnorm[0]);
        if (o.clip > 0.0 && norm > o.clip) { gi = gi * (o.clip / norm); }
        if (decay[i] != 0.0) { wi = wi * (1.0 - o.lr * o.wd); }
    }
    if (o.kind == 0u) {
        let mi = o.beta1 * m[i] + gi;
        m[i] = mi;
        w[i] = w[i] - o.lr * mi;
    } else {
        let mi = o.beta1 * m[i] + (1.0 - o.beta1) * gi;
        let vi = o.beta2 * v[i] + (1.0 - o.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] = wi - o.lr * (mi / o.c1) / (sqrt(vi / o.c2) + o.eps);
    }
}
