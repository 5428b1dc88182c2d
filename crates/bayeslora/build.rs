//! With `--features cuda`, compiles every `kernels/*.cu` to PTX (cudaforge, as candle-kernels
//! does) and writes `$OUT_DIR/ptx.rs` with one `&str` constant per file (`dropout.cu` →
//! `DROPOUT`), loaded at run time by `ops::cuda`. Without the feature it does nothing, so CPU
//! builds (and CI) need no CUDA toolkit.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            .watch(["kernels/dtype.cuh", "kernels/pack.cuh", "kernels/exact.cuh"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .unwrap_or_else(|e| panic!("compiling crates/bayeslora/kernels/*.cu with nvcc: {e}"));
        ptx.write(out.join("ptx.rs")).expect("writing ptx.rs into OUT_DIR");
    }
}
