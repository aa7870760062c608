// Layer-norm input gradient, one thread per row: dx = rstd * (dy*gain - mean(dy*gain)
// - xhat * mean(dy*gain*xhat)), plus the residual path's gradient res when p.b is 1.
// p: n=rows a=dim b=add res.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> gain: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(6) var<storage, read> res: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = flat_index(wid, nwg, lid);
    if (r >= p.n) { return; }
    let base = r * p.a;
    let mean = stats[2u * r];
    let rstd = stats[2u * r + 1u];
    var m1 = 0.0;
    var m2 = 0.0;
    for (var j = 0u; j < p.a; j++) {
        let xhat = (x[base + j] - mean) * rstd;
        let g = dy[base + j] * gain[j];
        m1 += g;
        m2 += g * xhat;
    }
    m1 /= f32(p.a);
    m2 /= f32(p.a);
    for (var j = 0u; j < p.a; j++) {
        let xhat = (x[base + j] - mean) * rstd;
        var d = rstd * (dy[base + j] * gain[j] - m1 - xhat * m2);
        if (p.b == 1u) { d += res[base + j]; }
        dx[base + j] = d;
    }
}
