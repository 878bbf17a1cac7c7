//! Few-shot episodes: the training sampler (spec §4.4) and fixed test episodes (spec §5.3).

use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::{augment_train, test_view, AugmentConfig, NormalizedImage};
use crate::dataset::{ClassId, FewShotDataset, FoldList, SampleRecord, Split};
use crate::error::{io_err, DataError, Result};
use crate::label::{Label, IGNORE};
use crate::rng::{SeededRng, StreamPurpose};

/// One model input: a normalised image and its binary label (1 object, 0 background, 255 ignore).
#[derive(Clone, Debug)]
pub struct PreparedView {
    pub image: NormalizedImage,
    pub label: Label,
}

/// A loaded episode: one query, K supports, all for one class.
#[derive(Clone, Debug)]
pub struct Episode {
    pub class_id: ClassId,
    pub query_id: String,
    pub support_ids: Vec<String>,
    pub query: PreparedView,
    /// The query's label values at the view's size with novel-class pixels set to 255 (training)
    /// — the source of the class-agnostic stage-1 targets (spec §2.3). In test episodes: the
    /// resized label as is.
    pub query_semantic: Label,
    pub supports: Vec<PreparedView>,
}

/// Query re-augmentations before another query image is drawn (spec §4.4: at most 100).
const MAX_QUERY_AUGMENTATIONS: usize = 100;
/// Query images tried per episode before giving up.
const MAX_QUERY_IMAGES: usize = 20;
/// Support images of one class tried (each `max_support_tries` times) before giving up.
const MAX_SUPPORT_IMAGES: usize = 10;

/// Draws `count` entries of `candidates`: distinct when there are enough, else with repeats.
fn draw_supports(candidates: &[usize], count: usize, rng: &mut SeededRng) -> Vec<usize> {
    if candidates.len() >= count {
        let mut pool = candidates.to_vec();
        // Partial Fisher–Yates: the first `count` entries become a uniform distinct sample.
        for i in 0..count {
            let j = i + rng.index(pool.len() - i);
            pool.swap(i, j);
        }
        pool.truncate(count);
        pool
    } else {
        (0..count).map(|_| candidates[rng.index(candidates.len())]).collect()
    }
}

/// Infinite training episodes of one fold: base classes only, novel pixels ignored (spec §4.4).
///
/// Episode `n` depends only on (dataset, fold, shot, seed, config, n): batches are built in
/// parallel and come out the same on any machine.
pub struct TrainEpisodeSampler {
    ds: FewShotDataset,
    fold: usize,
    shot: usize,
    seed: u64,
    cfg: AugmentConfig,
    list: FoldList,
    /// Membership table of novel class ids.
    novel: Vec<bool>,
    next_index: u64,
    epoch_order: Option<(u64, Vec<usize>)>,
}

impl TrainEpisodeSampler {
    pub fn new(ds: &FewShotDataset, fold: usize, shot: usize, seed: u64, cfg: AugmentConfig) -> Result<Self> {
        cfg.validate()?;
        if shot == 0 {
            return Err(DataError::Config("shot must be >= 1".into()));
        }
        let list = ds.fold_list(Split::Train, fold)?;
        if list.images.is_empty() {
            return Err(DataError::Empty {
                dataset: ds.name().into(),
                what: format!("train list of fold {fold}"),
                reason: format!("no train image has a base class covering >= {} px", ds.min_class_pixels()),
            });
        }
        let mut novel = vec![false; ds.num_classes() + 1];
        for &c in ds.novel_classes(fold)? {
            novel[c as usize] = true;
        }
        Ok(Self { ds: ds.clone(), fold, shot, seed, cfg, list, novel, next_index: 0, epoch_order: None })
    }

    /// The fold's PFENet train list.
    pub fn list(&self) -> &FoldList {
        &self.list
    }

    /// Index of the next episode `next_batch` will produce.
    pub fn position(&self) -> u64 {
        self.next_index
    }

    /// Jumps to episode `index` (e.g. when resuming training).
    pub fn seek(&mut self, index: u64) {
        self.next_index = index;
    }

    /// The next `batch` episodes, decoded and augmented in parallel.
    pub fn next_batch(&mut self, batch: usize) -> Result<Vec<Episode>> {
        let start = self.next_index;
        let queries: Vec<(u64, usize)> = (start..start + batch as u64).map(|n| (n, self.query_for(n))).collect();
        self.next_index += batch as u64;
        queries.into_par_iter().map(|(n, q)| self.build(n, q)).collect()
    }

    /// Episode `index` on its own (no state change).
    pub fn episode(&self, index: u64) -> Result<Episode> {
        let len = self.list.images.len() as u64;
        let order = self.epoch_permutation(index / len);
        self.build(index, order[(index % len) as usize])
    }

    /// detectron2's infinite TrainingSampler: a fresh permutation of the list per epoch.
    fn query_for(&mut self, n: u64) -> usize {
        let len = self.list.images.len() as u64;
        let epoch = n / len;
        if self.epoch_order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.epoch_order = Some((epoch, self.epoch_permutation(epoch)));
        }
        self.epoch_order.as_ref().expect("set above").1[(n % len) as usize]
    }

    fn epoch_permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order = self.list.images.clone();
        SeededRng::stream(self.seed, StreamPurpose::TrainEpochOrder, epoch).shuffle(&mut order);
        order
    }

    /// Support candidates of a class: its train images other than the query.
    fn candidates(&self, class: ClassId, query: usize) -> Vec<usize> {
        self.list.class_images.get(&class).map(|v| v.iter().copied().filter(|&i| i != query).collect()).unwrap_or_default()
    }

    fn build(&self, n: u64, first_query: usize) -> Result<Episode> {
        let mut rng = SeededRng::stream(self.seed, StreamPurpose::TrainEpisode, n);
        let samples = self.ds.samples(Split::Train);
        let mut query = first_query;
        for _ in 0..MAX_QUERY_IMAGES {
            let rec = &samples[query];
            let (img, lab) = rec.load()?;
            // Label values of novel classes in this sample.
            let mut novel_values = [false; 256];
            for p in &rec.classes {
                if self.novel[p.class_id as usize] {
                    novel_values[p.value as usize] = true;
                }
            }
            for _ in 0..MAX_QUERY_AUGMENTATIONS {
                let (qimg, mut qlab) = augment_train(&img, &lab, &self.cfg, &mut rng);
                qlab.ignore_values(&novel_values);
                let present: Vec<ClassId> = qlab
                    .values_present()
                    .into_iter()
                    .filter_map(|v| rec.class_of(v))
                    .filter(|&c| !self.novel[c as usize] && !self.candidates(c, query).is_empty())
                    .collect();
                if present.is_empty() {
                    continue;
                }
                let class = present[rng.index(present.len())];
                let value = rec.value_of(class).expect("present class has a value");
                let supports = self.supports(class, query, &mut rng)?;
                let (support_ids, supports): (Vec<String>, Vec<PreparedView>) = supports.into_iter().unzip();
                return Ok(Episode {
                    class_id: class,
                    query_id: rec.id.clone(),
                    support_ids,
                    query: PreparedView { image: NormalizedImage::from_rgb(&qimg), label: qlab.binary_for(value) },
                    query_semantic: qlab,
                    supports,
                });
            }
            // No base class survived 100 augmentations of this image: take another query.
            query = self.list.images[rng.index(self.list.images.len())];
        }
        Err(DataError::NoUsableQuery { fold: self.fold, tries: MAX_QUERY_IMAGES })
    }

    /// Draws and augments `shot` supports; each is re-augmented until the class covers
    /// `min_support_area` pixels, and an image that never does is replaced by another.
    fn supports(&self, class: ClassId, query: usize, rng: &mut SeededRng) -> Result<Vec<(String, PreparedView)>> {
        let samples = self.ds.samples(Split::Train);
        let candidates = self.candidates(class, query);
        let chosen = draw_supports(&candidates, self.shot, rng);
        let mut out = Vec::with_capacity(self.shot);
        for first in chosen {
            let mut idx = first;
            let mut found = None;
            let mut images_tried = 0;
            while images_tried < MAX_SUPPORT_IMAGES.min(candidates.len()).max(1) {
                images_tried += 1;
                let rec = &samples[idx];
                let value = rec.value_of(class).expect("class list member has the class");
                let (img, lab) = rec.load()?;
                for _ in 0..self.cfg.max_support_tries {
                    let (simg, slab) = augment_train(&img, &lab, &self.cfg, rng);
                    if slab.count(value) as f64 >= self.cfg.min_support_area {
                        found = Some((rec.id.clone(), PreparedView { image: NormalizedImage::from_rgb(&simg), label: slab.binary_for(value) }));
                        break;
                    }
                }
                if found.is_some() {
                    break;
                }
                idx = candidates[rng.index(candidates.len())];
            }
            match found {
                Some(view) => out.push(view),
                None => {
                    return Err(DataError::SupportAreaUnsatisfiable {
                        class_id: class,
                        class_name: self.ds.class_name(class)?.to_string(),
                        min_area: self.cfg.min_support_area,
                        tries: images_tried * self.cfg.max_support_tries,
                        images: images_tried,
                    })
                }
            }
        }
        Ok(out)
    }
}

/// One test episode by sample ids (val split).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeSpec {
    pub query: String,
    pub class_id: ClassId,
    /// At least `shot` support ids; the first `shot` are used (5 are drawn for 1-shot too, as the
    /// reference does, so 1-shot and 5-shot episodes share queries and first supports).
    pub supports: Vec<String>,
}

/// Number of episodes per fold in the paper's protocol.
pub const DEFAULT_TEST_EPISODES: usize = 1000;
/// Supports drawn per test episode regardless of shot (spec §5.3 item 4).
pub const TEST_SUPPORTS_DRAWN: usize = 5;

const EPISODES_FORMAT: &str = "mmformer-test-episodes-v1";

/// A fixed list of test episodes for one fold, exportable as JSON so that any implementation
/// can evaluate on exactly the same episodes.
///
/// The JSON form (`to_json`) is:
/// ```json
/// {"format": "mmformer-test-episodes-v1", "dataset": "VOC2012", "fold": 0, "shot": 1,
///  "seed": 4604572,
///  "episodes": [{"query": "2007_000033", "class_id": 1, "supports": ["2008_001234", ...]}]}
/// ```
/// Ids are val-split sample ids (VOC: the image id). The episodes drawn here follow the
/// reference protocol but use this crate's ChaCha stream, not CPython's `random`, so they are
/// not the reference's own 1000 episodes; to evaluate on those, dump them from Python in this
/// format and load them with [`TestEpisodes::read_json`], which validates them against the
/// dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestEpisodes {
    pub format: String,
    pub dataset: String,
    pub fold: usize,
    pub shot: usize,
    pub seed: u64,
    pub episodes: Vec<EpisodeSpec>,
}

impl TestEpisodes {
    /// Spec §5.3: repeat the fold's val list to >= `n`, shuffle, take `n`; per query a novel class
    /// present (any area) chosen uniformly, supports from that class's val list (not the query,
    /// distinct when possible), no size filter. Queries whose novel classes have no other image
    /// are left out (the reference would loop forever on them).
    pub fn generate(ds: &FewShotDataset, fold: usize, shot: usize, n: usize, seed: u64) -> Result<Self> {
        if shot == 0 || n == 0 {
            return Err(DataError::Config("shot and the number of episodes must be >= 1".into()));
        }
        let list = ds.fold_list(Split::Val, fold)?;
        let samples = ds.samples(Split::Val);
        let novel = ds.novel_classes(fold)?;
        let usable_classes = |q: usize| -> Vec<ClassId> {
            samples[q]
                .classes
                .iter()
                .map(|p| p.class_id)
                .filter(|c| novel.contains(c))
                .filter(|c| list.class_images.get(c).is_some_and(|v| v.iter().any(|&i| i != q)))
                .collect()
        };
        let queries: Vec<usize> = list.images.iter().copied().filter(|&q| !usable_classes(q).is_empty()).collect();
        if queries.is_empty() {
            return Err(DataError::Empty {
                dataset: ds.name().into(),
                what: format!("val list of fold {fold}"),
                reason: "no val image has a novel class (>= 2048 px) that appears in a second image".into(),
            });
        }
        let mut rng = SeededRng::stream(seed, StreamPurpose::TestEpisodes, 0);
        let mut pool = Vec::with_capacity(n + queries.len());
        while pool.len() < n {
            pool.extend_from_slice(&queries);
        }
        rng.shuffle(&mut pool);
        pool.truncate(n);
        let drawn = shot.max(TEST_SUPPORTS_DRAWN);
        let mut episodes = Vec::with_capacity(n);
        for q in pool {
            let classes = usable_classes(q);
            let class = classes[rng.index(classes.len())];
            let candidates: Vec<usize> = list.class_images[&class].iter().copied().filter(|&i| i != q).collect();
            let supports = draw_supports(&candidates, drawn, &mut rng);
            episodes.push(EpisodeSpec {
                query: samples[q].id.clone(),
                class_id: class,
                supports: supports.into_iter().map(|i| samples[i].id.clone()).collect(),
            });
        }
        Ok(Self { format: EPISODES_FORMAT.into(), dataset: ds.name().into(), fold, shot, seed, episodes })
    }

    /// [`generate`](Self::generate) with the paper's 1000 episodes and the official fold seed.
    pub fn generate_default(ds: &FewShotDataset, fold: usize, shot: usize) -> Result<Self> {
        Self::generate(ds, fold, shot, DEFAULT_TEST_EPISODES, ds.default_test_seed(fold)?)
    }

    pub fn len(&self) -> usize {
        self.episodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.episodes.is_empty()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("episodes serialise")
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()).map_err(io_err(path))
    }

    /// Parses and validates episodes against `ds`; `source_name` names the input in errors.
    pub fn from_json(json: &str, ds: &FewShotDataset, source_name: &str) -> Result<Self> {
        let eps: TestEpisodes = serde_json::from_str(json)
            .map_err(|e| DataError::BadEpisodes { source_name: source_name.into(), reason: e.to_string() })?;
        eps.validate(ds, source_name)?;
        Ok(eps)
    }

    pub fn read_json(path: &Path, ds: &FewShotDataset) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        Self::from_json(&text, ds, &path.display().to_string())
    }

    /// Checks that every episode can be loaded from `ds` and means what it says.
    pub fn validate(&self, ds: &FewShotDataset, source_name: &str) -> Result<()> {
        let bad = |reason: String| Err(DataError::BadEpisodes { source_name: source_name.into(), reason });
        if self.format != EPISODES_FORMAT {
            return bad(format!("format is {:?}, expected {EPISODES_FORMAT:?}", self.format));
        }
        if self.fold >= ds.num_folds() {
            return bad(format!("fold {} but the dataset has {} folds", self.fold, ds.num_folds()));
        }
        if self.shot == 0 {
            return bad("shot is 0".into());
        }
        if self.episodes.is_empty() {
            return bad("no episodes".into());
        }
        let novel = ds.novel_classes(self.fold)?;
        let samples = ds.samples(Split::Val);
        for (i, e) in self.episodes.iter().enumerate() {
            if !novel.contains(&e.class_id) {
                return bad(format!("episode {i}: class {} is not novel in fold {}", e.class_id, self.fold));
            }
            if e.supports.len() < self.shot {
                return bad(format!("episode {i}: {} supports for shot {}", e.supports.len(), self.shot));
            }
            for (role, id) in std::iter::once(("query", &e.query)).chain(e.supports.iter().map(|s| ("support", s))) {
                let Some(idx) = ds.find(Split::Val, id) else {
                    return bad(format!("episode {i}: {role} {id:?} is not in the dataset's val split"));
                };
                if samples[idx].pixels_of(e.class_id) == 0 {
                    return bad(format!("episode {i}: {role} {id:?} does not contain class {}", e.class_id));
                }
            }
        }
        Ok(())
    }

    /// Loads episode `index` as test views of `size` x `size` (480 in the paper).
    pub fn load(&self, ds: &FewShotDataset, index: usize, size: u32) -> Result<Episode> {
        let e = self.episodes.get(index).ok_or_else(|| DataError::BadEpisodes {
            source_name: self.dataset.clone(),
            reason: format!("episode {index} out of range (len {})", self.episodes.len()),
        })?;
        let find = |id: &str| -> Result<&SampleRecord> {
            ds.find(Split::Val, id).map(|i| &ds.samples(Split::Val)[i]).ok_or_else(|| DataError::BadEpisodes {
                source_name: self.dataset.clone(),
                reason: format!("sample {id:?} is not in the val split"),
            })
        };
        let view = |rec: &SampleRecord| -> Result<(PreparedView, Label)> {
            let (img, lab) = rec.load()?;
            let (img, lab) = test_view(&img, &lab, size);
            let value = rec.value_of(e.class_id).unwrap_or(IGNORE);
            Ok((PreparedView { image: NormalizedImage::from_rgb(&img), label: lab.binary_for(value) }, lab))
        };
        let (query, query_semantic) = view(find(&e.query)?)?;
        let supports = e.supports[..self.shot]
            .iter()
            .map(|id| view(find(id)?).map(|v| v.0))
            .collect::<Result<Vec<_>>>()?;
        Ok(Episode {
            class_id: e.class_id,
            query_id: e.query.clone(),
            support_ids: e.supports[..self.shot].to_vec(),
            query,
            query_semantic,
            supports,
        })
    }

    /// Loads a range of episodes in parallel.
    pub fn load_range(&self, ds: &FewShotDataset, range: Range<usize>, size: u32) -> Result<Vec<Episode>> {
        range.into_par_iter().map(|i| self.load(ds, i, size)).collect()
    }
}
