//! Copies the WGSL kernels into `OUT_DIR` without their comments and indentation, which
//! the GPU does not need and every visitor would download (the kernels are text in the
//! wasm bundle: 32 KB as written, about 3 KB of it gzipped in comments and spaces).
//! Each line keeps its number in its file (a kernel's shader errors count the lines of
//! what `gpu.rs` puts before it, such as the shared prelude, too).

use std::path::Path;

fn main() {
    let src = Path::new("src/engine/kernels");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = Path::new(&std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels");
    std::fs::create_dir_all(&out).expect("create OUT_DIR/kernels");
    for entry in std::fs::read_dir(src).expect("read the kernels folder") {
        let path = entry.expect("a kernel file").path();
        if path.extension().is_none_or(|e| e != "wgsl") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a kernel");
        let mut stripped = String::with_capacity(text.len());
        for line in text.lines() {
            // WGSL has no string literals: `//` always starts a comment.
            let code = line.split("//").next().unwrap_or_default();
            stripped.push_str(code.trim());
            stripped.push('\n');
        }
        let name = path.file_name().expect("a file name");
        std::fs::write(out.join(name), stripped).expect("write a kernel");
    }
}
