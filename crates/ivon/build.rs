//! With `--features cuda`, compiles `kernels/ivon.cu` to PTX (cudaforge, as candle-kernels and
//! bayeslora do) and writes `$OUT_DIR/ptx.rs` with the constant `IVON`, loaded at run time by
//! `device::cuda`. Without the feature it does nothing, so CPU builds need no CUDA toolkit.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let ptx = cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .unwrap_or_else(|e| panic!("compiling crates/ivon/kernels/ivon.cu with nvcc: {e}"));
        ptx.write(out.join("ptx.rs")).expect("writing ptx.rs into OUT_DIR");
    }
}
