//! Mixed-precision products on CUDA through cuBLAS's `GemmEx`: bf16/f16 operands, an f32
//! accumulator, the result in the operands' dtype or in f32, and a second product summed into
//! the same output (β = 1) where asked. candle's matmul has one dtype in and out, so the LoRA
//! path of a bf16 layer cast every activation it touched to f32 and back (issue 17: 10 % of a
//! Llama-2-7B step for the f32 side, plus the casts and adds); with these products
//! (`ops::lora_linear`) it reads and writes bf16 activations and r-wide products only, and its
//! sum with the frozen projection is the projection GEMM's own epilogue.
//!
//! Operands are row-major 2-D tensors; a row-major `C[m, n] = op(A)·op(B)` is the column-major
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so cuBLAS is called with the operands swapped.
//!
//! The operand swap ([`Product::column_major`]) is plain arithmetic, tested on the CPU against a
//! column-major reference product; the rest of the module is CUDA only.
use candle_core::{Result, Shape};
#[cfg(feature = "cuda")]
pub(crate) use cuda::{gemm, gemm_sum};

/// A cuBLAS (column-major) GEMM call `C' = op₁(X)·op₂(Y)`, `C'` being `rows × cols`: what
/// [`Product::column_major`] gives for a row-major product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColumnMajor {
    /// Whether the first operand (the row-major B) and the second (A) are transposed.
    pub t_first: bool,
    pub t_second: bool,
    pub rows: usize,
    pub cols: usize,
    pub inner: usize,
    /// Leading dimensions of the first operand, the second and the output.
    pub ld_first: usize,
    pub ld_second: usize,
    pub ld_out: usize,
}

/// One product `α · op(A) · op(B)` of row-major 2-D operands, `op` a transpose where asked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Product {
    pub ta: bool,
    pub tb: bool,
    pub alpha: f32,
}

impl Product {
    pub(crate) fn new(ta: bool, tb: bool, alpha: f32) -> Self {
        Self { ta, tb, alpha }
    }

    /// `(m, n, k)` of `op(A)[m, k] · op(B)[k, n]` from the stored shapes.
    fn dims(&self, a: &Shape, b: &Shape) -> Result<(usize, usize, usize)> {
        let (ar, ac) = a.dims2()?;
        let (br, bc) = b.dims2()?;
        let (m, k) = if self.ta { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.tb { (bc, br) } else { (br, bc) };
        if k != k2 {
            candle_core::bail!("gemm: op(A) is [{m}, {k}] but op(B) is [{k2}, {n}]");
        }
        Ok((m, n, k))
    }

    /// The column-major call for the row-major `C[m, n] = op(A)·op(B)`: `Cᵀ = op(B)ᵀ·op(A)ᵀ`, B
    /// first. A row-major `[r, c]` buffer is the column-major `[c, r]` one with leading
    /// dimension c, so B (stored `[k, n]`, or `[n, k]` when transposed) is `op(B)ᵀ` untransposed
    /// (ld n) or transposed (ld k), and likewise A (`[m, k]`: ld k; `[k, m]`: ld m).
    pub(crate) fn column_major(&self, m: usize, n: usize, k: usize) -> ColumnMajor {
        ColumnMajor {
            t_first: self.tb,
            t_second: self.ta,
            rows: n,
            cols: m,
            inner: k,
            ld_first: if self.tb { k } else { n },
            ld_second: if self.ta { m } else { k },
            ld_out: n,
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Product;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{
        CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
    };

    use crate::ops::cuda::contiguous_view;

    fn cuda_type(dtype: DType) -> Result<sys::cudaDataType> {
        Ok(match dtype {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType::CUDA_R_16F,
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            other => candle_core::bail!("gemm: no mixed-precision product for {other:?}"),
        })
    }

    /// `out = α·op(A)·op(B) + β·out` for `out: [m, n]` already allocated (`β = 0`: written, `1`:
    /// accumulated), on `dev`'s stream and cuBLAS handle (candle's own, so ordered with its ops).
    fn product_into<T: CudaDType + WithDType, O: CudaDType + WithDType>(
        dev: &candle_core::CudaDevice,
        p: Product,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        (m, n, k): (usize, usize, usize),
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<O>,
        beta: f32,
    ) -> Result<()> {
        let blas = dev.cublas_handle();
        let stream = dev.cuda_stream();
        let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        let c = p.column_major(m, n, k);
        let (a_ptr, _ra) = a.device_ptr(&stream);
        let (b_ptr, _rb) = b.device_ptr(&stream);
        let (c_ptr, _rc) = out.device_ptr_mut(&stream);
        let int =
            |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gemm: dimension {v} over 2^31")));
        // SAFETY: the views hold m·k, k·n elements and `out` m·n (checked by the callers' shapes);
        // alpha and beta are host scalars of the f32 compute type; the handle's stream is candle's.
        unsafe {
            gemm_ex(
                *blas.handle(),
                op(c.t_first),
                op(c.t_second),
                int(c.rows)?,
                int(c.cols)?,
                int(c.inner)?,
                (&p.alpha) as *const f32 as *const _,
                b_ptr as *const _,
                cuda_type(T::DTYPE)?,
                int(c.ld_first)?,
                a_ptr as *const _,
                cuda_type(T::DTYPE)?,
                int(c.ld_second)?,
                (&beta) as *const f32 as *const _,
                c_ptr as *mut _,
                cuda_type(O::DTYPE)?,
                int(c.ld_out)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .w()?;
        }
        Ok(())
    }

    /// `Σ_i α_i·op(A_i)·op(B_i)` into a fresh `[m, n]` buffer of `O`, the operands of dtype `T`.
    fn products<T: CudaDType + WithDType, O: CudaDType + WithDType + DeviceRepr + ValidAsZeroBits>(
        dev: &candle_core::CudaDevice,
        terms: &[(Product, (&CudaStorage, &Layout), (&CudaStorage, &Layout))],
    ) -> Result<(CudaStorage, Shape)> {
        let mut shape = None;
        let mut out = None;
        for (i, (p, (a, al), (b, bl))) in terms.iter().enumerate() {
            let dims = p.dims(al.shape(), bl.shape())?;
            let (m, n, k) = dims;
            if *shape.get_or_insert((m, n)) != (m, n) {
                candle_core::bail!("gemm: the products' shapes differ ({shape:?} vs {:?})", (m, n));
            }
            let out = match &mut out {
                Some(o) => o,
                None if k == 0 => out.insert(dev.alloc_zeros::<O>(m * n)?),
                // SAFETY: the first product (β = 0) writes all m·n elements.
                None => out.insert(unsafe { dev.alloc::<O>(m * n)? }),
            };
            if k == 0 || m * n == 0 {
                continue;
            }
            let a = contiguous_view::<T>(a, al, "gemm operand A")?;
            let b = contiguous_view::<T>(b, bl, "gemm operand B")?;
            product_into(dev, *p, &a, &b, dims, out, if i == 0 { 0.0 } else { 1.0 })?;
        }
        let (Some((m, n)), Some(out)) = (shape, out) else { candle_core::bail!("gemm: no product") };
        Ok((O::wrap_cuda_slice(out, dev.clone()), Shape::from((m, n))))
    }

    /// [`products`] with the dtypes read off the storages: operands bf16 or f16 (all alike), the
    /// result `out` (theirs or f32).
    fn dispatch(
        out: DType,
        terms: &[(Product, (&CudaStorage, &Layout), (&CudaStorage, &Layout))],
    ) -> Result<(CudaStorage, Shape)> {
        let dtype = terms[0].1 .0.dtype();
        if terms.iter().any(|(_, (a, _), (b, _))| a.dtype() != dtype || b.dtype() != dtype) {
            candle_core::bail!("gemm: every operand must be {dtype:?}");
        }
        let dev = terms[0].1 .0.device().clone();
        match (dtype, out) {
            (DType::BF16, DType::BF16) => products::<half::bf16, half::bf16>(&dev, terms),
            (DType::BF16, DType::F32) => products::<half::bf16, f32>(&dev, terms),
            (DType::F16, DType::F16) => products::<half::f16, half::f16>(&dev, terms),
            (DType::F16, DType::F32) => products::<half::f16, f32>(&dev, terms),
            (from, to) => candle_core::bail!("gemm: no product of {from:?} operands into {to:?}"),
        }
    }

    /// `α·op(A)·op(B)` as a fresh tensor of `out` (the operands' bf16/f16, or f32), outside the
    /// graph. CUDA only.
    pub(crate) fn gemm(a: &Tensor, b: &Tensor, p: Product, out: DType) -> Result<Tensor> {
        a.apply_op2_no_bwd(b, &Gemm { p, out })
    }

    /// `α₁·op(A₁)·op(B₁) + α₂·op(A₂)·op(W)` as one fresh tensor of the operands' dtype (the second
    /// product accumulates into the first's output in its epilogue), outside the graph. `w` is a
    /// frozen weight. CUDA only.
    pub(crate) fn gemm_sum(
        a1: &Tensor,
        b1: &Tensor,
        p1: Product,
        a2: &Tensor,
        w: &Tensor,
        p2: Product,
    ) -> Result<Tensor> {
        a1.apply_op3_no_bwd(b1, a2, &GemmSum { p1, p2, w: w.clone() })
    }

    struct Gemm {
        p: Product,
        out: DType,
    }

    impl CustomOp2 for Gemm {
        fn name(&self) -> &'static str {
            "gemm"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("gemm: the mixed-precision products are CUDA only")
        }

        fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
            dispatch(self.out, &[(self.p, (a, al), (b, bl))])
        }
    }

    struct GemmSum {
        p1: Product,
        p2: Product,
        w: Tensor,
    }

    impl CustomOp3 for GemmSum {
        fn name(&self) -> &'static str {
            "gemm-sum"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("gemm-sum: the mixed-precision products are CUDA only")
        }

        fn cuda_fwd(
            &self,
            a1: &CudaStorage,
            l1: &Layout,
            b1: &CudaStorage,
            lb: &Layout,
            a2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (w, wl) = self.w.storage_and_layout();
            let Storage::Cuda(w) = &*w else { candle_core::bail!("gemm-sum: the weight is not on the GPU") };
            dispatch(a1.dtype(), &[(self.p1, (a1, l1), (b1, lb)), (self.p2, (a2, l2), (w, wl))])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column-major reference: `C'[i, j] = α·Σ_l op₁(X)[i, l]·op₂(Y)[l, j]`, every element read
    /// through the leading dimensions as BLAS does.
    fn blas_reference(c: &ColumnMajor, alpha: f32, x: &[f32], y: &[f32]) -> Vec<f32> {
        let at =
            |buf: &[f32], t: bool, ld: usize, i: usize, l: usize| if t { buf[l + i * ld] } else { buf[i + l * ld] };
        let mut out = vec![0f32; c.ld_out * c.cols];
        for j in 0..c.cols {
            for i in 0..c.rows {
                let s: f32 = (0..c.inner)
                    .map(|l| at(x, c.t_first, c.ld_first, i, l) * at(y, c.t_second, c.ld_second, l, j))
                    .sum();
                out[i + j * c.ld_out] = alpha * s;
            }
        }
        out
    }

    /// The swapped column-major call computes the row-major `op(A)·op(B)` for every transpose
    /// combination (the GPU test checks cuBLAS itself).
    #[test]
    fn column_major_call_is_the_row_major_product() -> Result<()> {
        let (m, n, k) = (3, 5, 4);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = Product::new(ta, tb, 0.5);
            let a_shape = if ta { (k, m) } else { (m, k) };
            let b_shape = if tb { (n, k) } else { (k, n) };
            assert_eq!(p.dims(&Shape::from(a_shape), &Shape::from(b_shape))?, (m, n, k));
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.7).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 1.3).cos()).collect();
            let opa = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * k + l] };
            let opb = |l: usize, j: usize| if tb { b[j * k + l] } else { b[l * n + j] };
            let want: Vec<f32> =
                (0..m * n).map(|ij| 0.5 * (0..k).map(|l| opa(ij / n, l) * opb(l, ij % n)).sum::<f32>()).collect();
            let got = blas_reference(&p.column_major(m, n, k), p.alpha, &b, &a);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5, "ta {ta} tb {tb}: {g} vs {w}");
            }
        }
        assert!(Product::new(false, false, 1.0).dims(&Shape::from((3, 4)), &Shape::from((5, 2))).is_err());
        Ok(())
    }
}
