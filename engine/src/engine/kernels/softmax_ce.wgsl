// Fused softmax + cross-entropy, one thread per row: writes the row's loss and the
// gradient of the mean loss with respect to the logits, (softmax - onehot) / rows.
// Row losses go to loss[1 + row]; a non-finite one raises the flag in loss[0], which makes the optimizer skip the
// step. p: n=rows a=classes.
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = flat_index(wid, nwg, lid);
    if (r >= p.n) { return; }
    let base = r * p.a;
    var mx = logits[base];
    for (var j = 1u; j < p.a; j++) { mx = max(mx, logits[base + j]); }
    var sum = 0.0;
    for (var j = 0u; j < p.a; j++) { sum += exp(logits[base + j] - mx); }
    let log_sum = log(sum);
    let y = labels[r];
    let l = log_sum - (logits[base + y] - mx);
    loss[1u + r] = l;
    // NaN fails every comparison; infinity fails the bound.
    if (!(abs(l) < 3.0e38)) { loss[0] = 1.0; }
    let scale = 1.0 / f32(p.n);
    for (var j = 0u; j < p.a; j++) {
        let prob = exp(logits[base + j] - mx - log_sum);
        dlogits[base + j] = scale * (prob - select(0.0, 1.0, j == y));
    }
}
