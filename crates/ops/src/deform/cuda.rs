//! Launches of the CUDA deformable-attention kernels (kernel.cu) for [`MsDeformCore`].

use candle_core::cuda::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};

use super::kernel::MsDeformCore;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/deform.ptx"));
const MODULE: &str = "mmformer_ms_deform";
const BLOCK: u32 = 256;

fn launch_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl MsDeformCore {
    fn levels_on(&self, dev: &CudaDevice) -> Result<CudaSlice<u32>> {
        let flat: Vec<u32> = self
            .levels
            .iter()
            .flat_map(|&(h, w, start)| [h as u32, w as u32, start as u32])
            .collect();
        dev.cuda_stream().clone_htod(&flat).w()
    }

    fn check_sizes(&self) -> Result<()> {
        if self.b * self.s * self.heads * self.dh > i32::MAX as usize
            || self.s > i32::MAX as usize
            || self.lq > i32::MAX as usize
        {
            bail!("ms_deform_attn_core (cuda): sizes exceed the kernel's 32-bit dimensions");
        }
        Ok(())
    }

    fn fwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        dev: &CudaDevice,
        (v, lv): (&CudaStorage, &Layout),
        (l, ll): (&CudaStorage, &Layout),
        (a, la): (&CudaStorage, &Layout),
        suffix: &str,
    ) -> Result<CudaStorage> {
        self.check_sizes()?;
        let v = v.as_cuda_slice::<T>()?.slice(lv.start_offset()..);
        let l = l.as_cuda_slice::<T>()?.slice(ll.start_offset()..);
        let a = a.as_cuda_slice::<T>()?.slice(la.start_offset()..);
        let levels = self.levels_on(dev)?;
        let n = self.b * self.lq * self.heads * self.dh;
        let out = dev.alloc_zeros::<T>(n)?;
        let func = dev.get_or_load_custom_func(&format!("ms_deform_fwd_{suffix}"), MODULE, PTX)?;
        let dims = self.kernel_dims();
        let mut launch = func.builder();
        launch.arg(&v).arg(&l).arg(&a).arg(&levels).arg(&out);
        let n_arg = n as i64;
        launch.arg(&n_arg);
        for d in &dims {
            launch.arg(d);
        }
        unsafe { launch.launch(launch_cfg(n)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    fn kernel_dims(&self) -> [i32; 6] {
        [
            self.s as i32,
            self.lq as i32,
            self.heads as i32,
            self.dh as i32,
            self.levels.len() as i32,
            self.points as i32,
        ]
    }

    pub(super) fn cuda_forward(
        &self,
        v: (&CudaStorage, &Layout),
        l: (&CudaStorage, &Layout),
        a: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        for (layout, what) in [(v.1, "value"), (l.1, "locations"), (a.1, "weights")] {
            if !layout.is_contiguous() {
                bail!("ms_deform_attn_core (cuda): {what} must be contiguous");
            }
        }
        let dev = v.0.device().clone();
        let out = match (v.0.dtype(), l.0.dtype(), a.0.dtype()) {
            (DType::F32, DType::F32, DType::F32) => self.fwd_typed::<f32>(&dev, v, l, a, "f32")?,
            (DType::F64, DType::F64, DType::F64) => self.fwd_typed::<f64>(&dev, v, l, a, "f64")?,
            _ => bail!("ms_deform_attn_core (cuda): all inputs must be f32 or all f64"),
        };
        Ok((out, Shape::from((self.b, self.lq, self.heads, self.dh))))
    }

    fn bwd_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        dev: &CudaDevice,
        [value, loc, attn, grad]: [&Tensor; 4],
        suffix: &str,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        self.check_sizes()?;
        let (value, loc, attn, grad) =
            (value.contiguous()?, loc.contiguous()?, attn.contiguous()?, grad.contiguous()?);
        let (sv, lv) = value.storage_and_layout();
        let (sl, ll) = loc.storage_and_layout();
        let (sa, la) = attn.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (Storage::Cuda(sv), Storage::Cuda(sl), Storage::Cuda(sa), Storage::Cuda(sg)) =
            (&*sv, &*sl, &*sa, &*sg)
        else {
            bail!("ms_deform_attn_core (cuda): backward inputs must all be on the GPU");
        };
        let v = sv.as_cuda_slice::<T>()?.slice(lv.start_offset()..);
        let l = sl.as_cuda_slice::<T>()?.slice(ll.start_offset()..);
        let a = sa.as_cuda_slice::<T>()?.slice(la.start_offset()..);
        let g = sg.as_cuda_slice::<T>()?.slice(lg.start_offset()..);
        let levels = self.levels_on(dev)?;
        let n_points = self.b * self.lq * self.heads * self.levels.len() * self.points;
        let gv = dev.alloc_zeros::<T>(self.b * self.s * self.heads * self.dh)?;
        let gl = dev.alloc_zeros::<T>(2 * n_points)?;
        let ga = dev.alloc_zeros::<T>(n_points)?;
        let (kernel, threads) = match super::cuda_backward() {
            super::CudaBackward::Warp => ("ms_deform_bwd_warp", n_points * 32),
            super::CudaBackward::Thread => ("ms_deform_bwd", n_points),
        };
        let func = dev.get_or_load_custom_func(&format!("{kernel}_{suffix}"), MODULE, PTX)?;
        let dims = self.kernel_dims();
        let mut launch = func.builder();
        launch.arg(&v).arg(&l).arg(&a).arg(&g).arg(&levels);
        launch.arg(&gv).arg(&gl).arg(&ga);
        let n_arg = n_points as i64;
        launch.arg(&n_arg);
        for d in &dims {
            launch.arg(d);
        }
        unsafe { launch.launch(launch_cfg(threads)) }.w()?;
        let wrap = |s: CudaSlice<T>, shape: &Shape| {
            Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
                shape.clone(),
                BackpropOp::none(),
                false,
            )
        };
        Ok((wrap(gv, value.shape()), wrap(gl, loc.shape()), wrap(ga, attn.shape())))
    }

    /// Gradients w.r.t. value, locations and attention weights, computed on the GPU.
    pub(super) fn cuda_backward(
        &self,
        value: &Tensor,
        loc: &Tensor,
        attn: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let candle_core::Device::Cuda(dev) = value.device() else {
            bail!("ms_deform_attn_core (cuda): backward called off the GPU");
        };
        let grad = grad.to_dtype(value.dtype())?;
        let ts = [value, loc, attn, &grad];
        match value.dtype() {
            DType::F32 => self.bwd_typed::<f32>(dev, ts, "f32"),
            DType::F64 => self.bwd_typed::<f64>(dev, ts, "f64"),
            dt => bail!("ms_deform_attn_core (cuda): unsupported dtype {dt:?}"),
        }
    }
}
