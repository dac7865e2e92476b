//! Strict weight loading from diffusers-style safetensors files.
//!
//! Model constructors ask a [`Vb`] ("var builder") for tensors by their diffusers module path
//! (`down_blocks.0.attentions.0.proj_in.weight`), so files load with no renaming table. Unlike a
//! permissive loader, the [`WeightStore`] checks every request: a missing key or a wrong shape is
//! an error naming the file, the key and both shapes, and [`WeightStore::finish`] fails on keys
//! the model never asked for. Nothing loads half-right in silence (docs/formats.md §1.1).
//!
//! Weights are memory-mapped and converted to the requested dtype on load. Names matching the
//! store's trainable predicate come back as [`Var`]s, so gradients reach them; all other weights
//! are plain tensors that record no gradient. Names matching the patchable predicate are held
//! in a [`Var`] too, but the model gets an untracked view of its storage: the patch layer
//! (`crate::patch`) can then change them in place (`Var::set`) and restore them, while
//! inference keeps its untracked fast path.
//!
//! A store can also read through a [`TensorSource`] instead of files: a single-file checkpoint
//! whose CompVis names are mapped to diffusers names in memory (model/single_file/).

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

type TrainablePredicate = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Loads a tensor by diffusers name from somewhere other than diffusers safetensors files
/// (its shape was given to [`WeightStore::from_source`]).
pub type TensorSource = Box<dyn Fn(&str, &Device) -> Result<Tensor> + Send + Sync>;

/// Where a store's tensors are read from.
enum Backing {
    Files(MmapedSafetensors),
    Source(TensorSource),
}

/// The tensors of one model component (one or more safetensors files), with bookkeeping of
/// which keys were used.
pub struct WeightStore {
    files: Vec<PathBuf>,
    st: Backing,
    /// key -> (shape, index of the file that holds it)
    index: BTreeMap<String, (Vec<usize>, usize)>,
    used: Mutex<BTreeSet<String>>,
    dtype: DType,
    device: Device,
    trainable: Option<TrainablePredicate>,
    patchable: Option<TrainablePredicate>,
    vars: Mutex<Vec<(String, Var)>>,
    patchable_vars: Mutex<Vec<(String, Var)>>,
    frozen: Mutex<Vec<(String, Tensor)>>,
    /// Benchmark mode: every requested tensor is made up (see [`WeightStore::random`]).
    random: Option<Mutex<rand::rngs::StdRng>>,
}

impl WeightStore {
    /// Memory-maps the given safetensors files. A truncated or corrupt file is an error naming it.
    pub fn open(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            if !f.is_file() {
                bail!("weight file {} does not exist", f.display());
            }
            let st = unsafe { MmapedSafetensors::new(f) }.with_context(|| {
                format!("{} is not a readable safetensors file (truncated or corrupt?)", f.display())
            })?;
            for (name, view) in st.tensors() {
                if let Some((_, other)) = index.insert(name.clone(), (view.shape().to_vec(), i)) {
                    bail!(
                        "tensor {name} appears both in {} and {}",
                        files[other].display(),
                        f.display()
                    );
                }
            }
        }
        let st = unsafe { MmapedSafetensors::multi(files) }?;
        Ok(Self::with_parts(files.to_vec(), Backing::Files(st), index, dtype, device, None))
    }

    /// A store over the tensors of `source`, which holds `shapes` (diffusers name -> shape);
    /// `label` names the file they come from in messages.
    pub fn from_source(label: &Path, shapes: BTreeMap<String, Vec<usize>>, source: TensorSource, dtype: DType, device: &Device) -> Self {
        let index = shapes.into_iter().map(|(k, s)| (k, (s, 0))).collect();
        Self::with_parts(vec![label.to_path_buf()], Backing::Source(source), index, dtype, device, None)
    }

    fn with_parts(
        files: Vec<PathBuf>,
        st: Backing,
        index: BTreeMap<String, (Vec<usize>, usize)>,
        dtype: DType,
        device: &Device,
        random: Option<Mutex<rand::rngs::StdRng>>,
    ) -> Self {
        Self {
            files,
            st,
            index,
            used: Mutex::new(BTreeSet::new()),
            dtype,
            device: device.clone(),
            trainable: None,
            patchable: None,
            vars: Mutex::new(Vec::new()),
            patchable_vars: Mutex::new(Vec::new()),
            frozen: Mutex::new(Vec::new()),
            random,
        }
    }

    /// A store with no files that makes up every tensor it is asked for: 1-D `weight`s are
    /// ones (norm scales), biases zeros, other weights normal with std 1/sqrt(fan_in). For
    /// benchmarks and tests of shapes, never for real use.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        use rand::SeedableRng;
        let st = unsafe { MmapedSafetensors::multi::<PathBuf>(&[]) }.expect("empty store");
        let rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self::with_parts(Vec::new(), Backing::Files(st), BTreeMap::new(), dtype, device, Some(Mutex::new(rng)))
    }

    fn made_up(&self, name: &str, shape: &Shape) -> Result<Tensor> {
        let dims = shape.dims();
        let t = if name.ends_with("bias") {
            Tensor::zeros(shape, DType::F32, &self.device)?
        } else if dims.len() == 1 {
            Tensor::ones(shape, DType::F32, &self.device)?
        } else {
            let fan_in: usize = dims[1..].iter().product();
            let mut rng = self.random.as_ref().unwrap().lock().unwrap();
            crate::util::randn(&mut rng, dims, &self.device)?.affine(1.0 / (fan_in as f64).sqrt(), 0.0)?
        };
        Ok(t)
    }

    /// Tensors whose full name satisfies `pred` are loaded as trainable [`Var`]s (in f32).
    pub fn with_trainable(mut self, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.trainable = Some(Box::new(pred));
        self
    }

    /// Tensors whose full name satisfies `pred` (and are not trainable) are held in a
    /// [`Var`] of the store's dtype that the patch layer can set; the model gets an untracked
    /// view of the same storage.
    pub fn with_patchable(mut self, pred: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.patchable = Some(Box::new(pred));
        self
    }

    /// A path builder rooted at this store.
    pub fn root(self: &Arc<Self>) -> Vb {
        Vb { store: self.clone(), prefix: String::new() }
    }

    pub fn file_names(&self) -> String {
        self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every stored tensor's name and shape, sorted by name.
    pub fn tensor_shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.index.iter().map(|(n, (s, _))| (n.as_str(), s.as_slice()))
    }

    /// Shape of a stored tensor, if present.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|(s, _)| s.as_slice())
    }

    /// Loads `name`, checking it exists and has `shape`.
    pub fn get(&self, name: &str, shape: &Shape) -> Result<Tensor> {
        if self.random.is_some() {
            let t = self.made_up(name, shape)?;
            return self.hand_out(name, t);
        }
        let Some((stored, file)) = self.index.get(name) else {
            bail!("weight {name} is missing from {} (expected shape {:?})", self.file_names(), shape.dims());
        };
        if stored.as_slice() != shape.dims() {
            bail!(
                "weight {name} in {} has shape {:?}, but the model config needs {:?}",
                self.files[*file].display(),
                stored,
                shape.dims()
            );
        }
        self.used.lock().unwrap().insert(name.to_string());
        let t = match &self.st {
            Backing::Files(st) => st.load(name, &self.device).map_err(anyhow::Error::from),
            Backing::Source(load) => load(name, &self.device),
        }
        .with_context(|| format!("reading {name} from {}", self.files[*file].display()))?;
        self.hand_out(name, t)
    }

    /// Wraps a loaded tensor as a variable or a frozen tensor of the store's dtype.
    fn hand_out(&self, name: &str, t: Tensor) -> Result<Tensor> {
        let trainable = self.trainable.as_ref().is_some_and(|p| p(name));
        if trainable {
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            self.vars.lock().unwrap().push((name.to_string(), var.clone()));
            Ok(var.as_tensor().clone())
        } else if self.patchable.as_ref().is_some_and(|p| p(name)) {
            let var = Var::from_tensor(&t.to_dtype(self.dtype)?)?;
            self.patchable_vars.lock().unwrap().push((name.to_string(), var.clone()));
            let view = var.as_detached_tensor();
            self.frozen.lock().unwrap().push((name.to_string(), view.clone()));
            Ok(view)
        } else {
            let t = t.to_dtype(self.dtype)?;
            self.frozen.lock().unwrap().push((name.to_string(), t.clone()));
            Ok(t)
        }
    }

    /// The frozen (non-variable) tensors handed out so far, e.g. to check that none of them
    /// receives a gradient.
    pub fn frozen(&self) -> Vec<(String, Tensor)> {
        self.frozen.lock().unwrap().clone()
    }

    /// The trainable variables created so far, in load order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars.lock().unwrap().clone()
    }

    /// The patchable (frozen, settable) weights created so far, in load order.
    pub fn patchable_vars(&self) -> Vec<(String, Var)> {
        self.patchable_vars.lock().unwrap().clone()
    }

    /// Fails if the files hold tensors the model never asked for (a sign of a config or
    /// architecture mismatch that would otherwise load silently).
    pub fn finish(&self) -> Result<()> {
        let used = self.used.lock().unwrap();
        let unused: Vec<&String> = self.index.keys().filter(|k| !used.contains(*k)).collect();
        if !unused.is_empty() {
            let shown: Vec<_> = unused.iter().take(8).map(|s| s.as_str()).collect();
            bail!(
                "{} holds {} weight(s) this model does not use, e.g. {}: the config does not match the weights",
                self.file_names(),
                unused.len(),
                shown.join(", ")
            );
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// A position in the module tree: `vb.pp("down_blocks").pp(0).get((c, c), "weight")`.
#[derive(Clone)]
pub struct Vb {
    store: Arc<WeightStore>,
    prefix: String,
}

impl Vb {
    /// Push a path component.
    pub fn pp(&self, part: impl ToString) -> Vb {
        let part = part.to_string();
        let prefix = if self.prefix.is_empty() { part } else { format!("{}.{}", self.prefix, part) };
        Vb { store: self.store.clone(), prefix }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.store.get(&self.full(name), &shape.into())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.full(name))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn dtype(&self) -> DType {
        self.store.dtype
    }
    pub fn device(&self) -> &Device {
        &self.store.device
    }
}

/// Finds the weights file of a diffusers component folder: `<stem>.safetensors`, or
/// `<stem>.<variant>.safetensors` when a variant (e.g. "fp16") is asked for; also sharded
/// `<stem>-00001-of-0000N.safetensors` files listed by an index json.
pub fn component_weight_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let name = match variant {
        Some(v) => format!("{stem}.{v}.safetensors"),
        None => format!("{stem}.safetensors"),
    };
    let single = dir.join(&name);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{name}.index.json"));
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut hint = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let others: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".safetensors") || n.ends_with(".bin") || n.ends_with(".ckpt"))
            .collect();
        if !others.is_empty() {
            hint = format!(" (found: {}; pick a variant with --variant, or convert .bin/.ckpt files to safetensors)", others.join(", "));
        }
    } else {
        bail!("model component folder {} does not exist", dir.display());
    }
    bail!("no weights file {} in {}{hint}", name, dir.display())
}
