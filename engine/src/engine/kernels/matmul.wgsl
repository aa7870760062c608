// Tiled matrix product C[M,N] = A[M,K] · B[K,N] (+ bias[N]) (then max(0, .)).
//
// A workgroup of 16x16 threads computes a 64x64 tile of C; each thread holds a 4x4
// register block (four vec4 accumulators). Per step along K it stages a 64x16 slab of A
// and a 16x64 slab of B in workgroup memory as vec4s, so every inner-loop iteration does
// two vec4 loads from workgroup memory and four vec4 multiply-adds.
//
// The host fills in the double-braced placeholders with how each operand is read from
// global memory: row-major or transposed, and with one vec4 load per thread when the
// contiguous dimension is a multiple of four, scalar loads with bounds checks otherwise.

struct Dims {
    m: u32,
    n: u32,
    k: u32,
    // bit 0: add bias; bit 1: rectify.
    flags: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<{{A_ELEM}}>;
@group(0) @binding(2) var<storage, read> b: array<{{B_ELEM}}>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

// sa[k * 16 + i] holds rows 4i..4i+3 of the A slab at depth k; sb[k * 16 + j] holds
// columns 4j..4j+3 of the B slab at depth k.
var<workgroup> sa: array<vec4<f32>, 256>;
var<workgroup> sb: array<vec4<f32>, 256>;

fn a_at(row: u32, col: u32) -> f32 {
    // Logical A[row, col], zero outside the matrix.
    if (row >= dims.m || col >= dims.k) { return 0.0; }
    {{A_SCALAR}}
}

fn b_at(row: u32, col: u32) -> f32 {
    if (row >= dims.k || col >= dims.n) { return 0.0; }
    {{B_SCALAR}}
}

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let t = ty * 16u + tx;
    let row0 = wid.y * TM;
    let col0 = wid.x * TN;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < dims.k; k0 += TK) {
        {{LOAD_A}}
        {{LOAD_B}}
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let av = sa[kk * 16u + ty];
            let bv = sb[kk * 16u + tx];
            acc[0] = fma(vec4<f32>(av.x), bv, acc[0]);
            acc[1] = fma(vec4<f32>(av.y), bv, acc[1]);
            acc[2] = fma(vec4<f32>(av.z), bv, acc[2]);
            acc[3] = fma(vec4<f32>(av.w), bv, acc[3]);
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + ty * 4u + i;
        if (row >= dims.m) { break; }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + tx * 4u + j;
            if (col >= dims.n) { break; }
            var v = acc[i][j];
            if ((dims.flags & 1u) != 0u) { v += bias[col]; }
            if ((dims.flags & 2u) != 0u) { v = max(v, 0.0); }
            c[row * dims.n + col] = v;
        }
    }
}
