//! [`Device::Cuda`](crate::Device::Cuda): the model specialised to each set of input shapes
//! it is run with, optimised, partitioned and emitted as PTX by kiln-cuda, loaded on the GPU
//! and kept (one loaded program per shape set).

use crate::{Device, Error, Options};
use kiln_ir::{Graph, Tensor};
use std::sync::{Arc, Mutex};

/// The input shapes a program was made for.
type ShapeSet = Vec<Vec<usize>>;

/// Programs kept per executable (distinct input-shape sets), oldest dropped first.
const PROGRAMS: usize = 8;

pub(crate) struct Cuda {
    device: Arc<kiln_cuda::Device>,
    /// The graph as loaded (specialised before optimising, per shape set).
    graph: Graph,
    opts: Options,
    loaded: Mutex<Vec<(ShapeSet, Arc<kiln_cuda::Loaded>)>>,
}

pub(crate) fn err(ordinal: usize) -> impl Fn(String) -> Error {
    move |msg| Error::Device {
        device: Device::Cuda(ordinal),
        msg,
    }
}

impl Cuda {
    pub(crate) fn open(graph: &Graph, opts: &Options, ordinal: usize) -> Result<Cuda, Error> {
        let device = kiln_cuda::Device::open(ordinal).map_err(|e| err(ordinal)(e.to_string()))?;
        Ok(Cuda {
            device: Arc::new(device),
            graph: graph.clone(),
            opts: opts.clone(),
            loaded: Mutex::new(vec![]),
        })
    }

    fn ordinal(&self) -> usize {
        match self.opts.device {
            Device::Cuda(i) => i,
            Device::Cpu => 0,
        }
    }

    /// The loaded program for these inputs' shapes, made on first use.
    fn program(&self, inputs: &[Tensor]) -> Result<Arc<kiln_cuda::Loaded>, Error> {
        let key: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let mut cache = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, l)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(l.clone());
        }
        let e = err(self.ordinal());
        let g = kiln_cuda::specialise(&self.graph, &key).map_err(|x| e(x.to_string()))?;
        let mut g = crate::Model::from_graph(g).optimised(&self.opts)?;
        kiln_cuda::settle_shapes(&mut g).map_err(|x| e(x.to_string()))?;
        let plan = kiln_plan::partition(&g).map_err(|x| e(format!("partitioning: {x}")))?;
        let program =
            kiln_cuda::Program::new(plan, self.device.sm()).map_err(|x| e(x.to_string()))?;
        let loaded = Arc::new(
            kiln_cuda::Loaded::new(self.device.clone(), program).map_err(|x| e(x.to_string()))?,
        );
        if cache.len() >= PROGRAMS {
            cache.remove(0);
        }
        cache.push((key, loaded.clone()));
        Ok(loaded)
    }

    pub(crate) fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let l = self.program(&inputs)?;
        l.run(inputs)
            .map_err(|x| err(self.ordinal())(x.to_string()))
    }

    /// Ops of the last-made program that run on the host, with counts.
    pub(crate) fn host_ops(&self) -> Vec<(String, usize)> {
        let cache = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .last()
            .map(|(_, l)| l.program().host_ops())
            .unwrap_or_default()
    }

    pub(crate) fn describe(&self) -> String {
        format!("{:?}", self.device)
    }
}
