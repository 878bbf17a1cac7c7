//! Stage 2 over cached proposals: the image views `cache-proposals` stores, and the episodes
//! stage 2 draws from a shard folder without any model weights.
//!
//! Training views are the k-th seeded augmentation (spec §4.3) of each image of the fold's train
//! list, k = 0..K; test views are the deterministic resize of §1.1. Stored labels hold class ids
//! (0 background, 255 ignore), not the dataset's raw label values, so a shard folder is
//! self-contained. [`ShardEpisodeSampler`] follows the training sampler of spec §4.4 over those
//! views: query image from an epoch permutation, a random cached view of it, a base class present
//! in that view (novel pixels ignored), and `shot` supports of the class whose cached view covers
//! at least `min_support_area` pixels.

use std::collections::BTreeMap;

use crate::augment::{augment_train, test_view, AugmentConfig, NormalizedImage};
use crate::dataset::{ClassId, SampleRecord};
use crate::episodes::TestEpisodes;
use crate::error::{DataError, Result};
use crate::label::{Label, IGNORE};
use crate::rng::{SeededRng, StreamPurpose};
use crate::shard::{ProposalRecord, RecordMeta, ShardError, ShardReader, ShardView};

/// Largest class id a cached (8-bit) label can hold; 255 is ignore.
pub const MAX_CACHED_CLASS_ID: ClassId = IGNORE as ClassId - 1;

/// A label's raw values mapped to class ids (0 = background or unknown value, 255 = ignore).
///
/// Cached labels are 8-bit, so a class id above [`MAX_CACHED_CLASS_ID`] (FSS-1000 has 1000
/// classes) is refused here, when the view is cached, naming the sample and the id: narrowing
/// it would silently relabel the pixels as another class (256 as background, 255 as ignore).
pub fn class_id_label(rec: &SampleRecord, label: &Label) -> Result<Label> {
    let mut table = [0u8; 256];
    table[IGNORE as usize] = IGNORE;
    for p in &rec.classes {
        table[p.value as usize] = narrow_class_id(p.class_id, || rec.describe())?;
    }
    let data = label.data().iter().map(|&v| table[v as usize]).collect();
    Ok(Label::new(label.width(), label.height(), data))
}

/// `class` as the 8-bit value cached labels hold, or [`DataError::ClassIdTooWide`] naming
/// `sample()`.
fn narrow_class_id(class: ClassId, sample: impl FnOnce() -> String) -> Result<u8> {
    match u8::try_from(class) {
        Ok(c) if class <= MAX_CACHED_CLASS_ID => Ok(c),
        _ => Err(DataError::ClassIdTooWide { sample: sample(), class_id: class }),
    }
}

/// The k-th cached training view of `rec` (train-split index `index`): its seeded augmentation
/// and the class-id label. The same (seed, index, k) always gives the same view.
pub fn cached_train_view(rec: &SampleRecord, index: usize, k: u32, cfg: &AugmentConfig, seed: u64) -> Result<(NormalizedImage, Label)> {
    let (img, lab) = rec.load()?;
    let mut rng = SeededRng::stream(seed, StreamPurpose::CachedView, ((index as u64) << 16) | k as u64);
    let (img, lab) = augment_train(&img, &lab, cfg, &mut rng);
    Ok((NormalizedImage::from_rgb(&img), class_id_label(rec, &lab)?))
}

/// The cached test view of `rec`: resized to `size`², class-id label.
pub fn cached_test_view(rec: &SampleRecord, size: u32) -> Result<(NormalizedImage, Label)> {
    let (img, lab) = rec.load()?;
    let (img, lab) = test_view(&img, &lab, size);
    Ok((NormalizedImage::from_rgb(&img), class_id_label(rec, &lab)?))
}

/// Binary label of `class` from a class-id label: 1 = class, 255 = ignore or any class in
/// `ignored`, 0 = everything else.
pub fn binary_label(label: &[u8], class: u8, ignored: &[ClassId]) -> Vec<u8> {
    let mut table = [0u8; 256];
    table[IGNORE as usize] = IGNORE;
    // An id above 254 cannot occur in a cached label (see `class_id_label`): nothing to ignore.
    for &c in ignored.iter().filter(|&&c| c <= MAX_CACHED_CLASS_ID) {
        table[c as usize] = IGNORE;
    }
    table[class as usize] = 1;
    label.iter().map(|&v| table[v as usize]).collect()
}

/// One stage-2 training episode as record indices of a shard index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardEpisodeSpec {
    pub class_id: ClassId,
    pub query: usize,
    pub supports: Vec<usize>,
}

/// Query images tried before giving up, as in the live sampler.
const MAX_QUERY_IMAGES: usize = 20;
/// Support images tried per shot before giving up.
const MAX_SUPPORT_IMAGES: usize = 10;

/// Episodes of one fold over the augmented views of a shard index (spec §4.4 semantics).
///
/// Episode `n` depends only on (records, novel classes, shot, seed, n).
pub struct ShardEpisodeSampler {
    /// Record indices of each image's augmented views.
    images: Vec<Vec<usize>>,
    /// Per record: (class id, pixels).
    classes: Vec<Vec<(u8, u32)>>,
    /// Images (positions in `images`) with a view where the class covers `min_support_area`.
    class_images: BTreeMap<ClassId, Vec<usize>>,
    novel: Vec<ClassId>,
    is_novel: [bool; 256],
    shot: usize,
    seed: u64,
    min_support_area: f64,
}

impl ShardEpisodeSampler {
    pub fn new(records: &[RecordMeta], novel: &[ClassId], shot: usize, seed: u64, min_support_area: f64) -> Result<Self> {
        if shot == 0 {
            return Err(DataError::Config("shot must be >= 1".into()));
        }
        let mut is_novel = [false; 256];
        novel.iter().filter(|&&c| c <= MAX_CACHED_CLASS_ID).for_each(|&c| is_novel[c as usize] = true);
        let mut by_image: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            if matches!(r.view, ShardView::Augmented(_)) {
                by_image.entry(r.image_id.as_str()).or_default().push(i);
            }
        }
        let images: Vec<Vec<usize>> = by_image.into_values().collect();
        let mut class_images: BTreeMap<ClassId, Vec<usize>> = BTreeMap::new();
        for (im, views) in images.iter().enumerate() {
            let mut seen = [false; 256];
            for &r in views {
                for &(c, px) in &records[r].classes {
                    if c != 0 && !is_novel[c as usize] && px as f64 >= min_support_area && !seen[c as usize] {
                        seen[c as usize] = true;
                        class_images.entry(c as ClassId).or_default().push(im);
                    }
                }
            }
        }
        if images.is_empty() || class_images.is_empty() {
            return Err(DataError::Empty {
                dataset: "proposal shards".into(),
                what: "augmented training views".into(),
                reason: format!(
                    "{} records, {} images with augmented views, none with a base class covering >= {min_support_area:.0} px (run cache-proposals with --views >= 1 on the train split)",
                    records.len(),
                    images.len()
                ),
            });
        }
        let classes = records.iter().map(|r| r.classes.clone()).collect();
        Ok(Self { images, classes, class_images, novel: novel.to_vec(), is_novel, shot, seed, min_support_area })
    }

    /// Number of distinct images with cached training views.
    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    /// Base classes that can form episodes.
    pub fn classes(&self) -> Vec<ClassId> {
        self.class_images.keys().copied().collect()
    }

    /// Novel classes (ignored in query labels).
    pub fn novel(&self) -> &[ClassId] {
        &self.novel
    }

    fn candidates(&self, class: ClassId, query_image: usize) -> Vec<usize> {
        self.class_images.get(&class).map(|v| v.iter().copied().filter(|&i| i != query_image).collect()).unwrap_or_default()
    }

    /// Episode `n`.
    pub fn episode(&self, n: u64) -> Result<ShardEpisodeSpec> {
        let len = self.images.len() as u64;
        let mut order: Vec<usize> = (0..self.images.len()).collect();
        SeededRng::stream(self.seed, StreamPurpose::ShardEpochOrder, n / len).shuffle(&mut order);
        let mut rng = SeededRng::stream(self.seed, StreamPurpose::ShardEpisode, n);
        let mut image = order[(n % len) as usize];
        for _ in 0..MAX_QUERY_IMAGES {
            let mut views = self.images[image].clone();
            rng.shuffle(&mut views);
            for q in views {
                let present: Vec<ClassId> = self.classes[q]
                    .iter()
                    .map(|&(c, _)| c as ClassId)
                    .filter(|&c| c != 0 && c != IGNORE as ClassId && !self.is_novel[c as usize] && !self.candidates(c, image).is_empty())
                    .collect();
                if present.is_empty() {
                    continue;
                }
                let class = present[rng.index(present.len())];
                let supports = self.supports(class, image, &mut rng)?;
                return Ok(ShardEpisodeSpec { class_id: class, query: q, supports });
            }
            image = rng.index(self.images.len());
        }
        Err(DataError::Config(format!("episode {n}: no cached query view with a usable base class after {MAX_QUERY_IMAGES} images")))
    }

    fn supports(&self, class: ClassId, query_image: usize, rng: &mut SeededRng) -> Result<Vec<usize>> {
        let candidates = self.candidates(class, query_image);
        let mut pool = candidates.clone();
        let distinct = pool.len() >= self.shot;
        let mut out = Vec::with_capacity(self.shot);
        for s in 0..self.shot {
            // Distinct images when there are enough (partial Fisher–Yates), else with repeats.
            let mut image = if distinct {
                let j = s + rng.index(pool.len() - s);
                pool.swap(s, j);
                pool[s]
            } else {
                candidates[rng.index(candidates.len())]
            };
            let mut chosen = None;
            for _ in 0..MAX_SUPPORT_IMAGES {
                let ok: Vec<usize> = self.images[image]
                    .iter()
                    .copied()
                    .filter(|&r| self.classes[r].iter().any(|&(c, px)| c as ClassId == class && px as f64 >= self.min_support_area))
                    .collect();
                if !ok.is_empty() {
                    chosen = Some(ok[rng.index(ok.len())]);
                    break;
                }
                image = candidates[rng.index(candidates.len())];
            }
            match chosen {
                Some(r) => out.push(r),
                None => {
                    return Err(DataError::SupportAreaUnsatisfiable {
                        class_id: class,
                        class_name: format!("class {class}"),
                        min_area: self.min_support_area,
                        tries: MAX_SUPPORT_IMAGES,
                        images: MAX_SUPPORT_IMAGES,
                    })
                }
            }
        }
        Ok(out)
    }
}

/// A stage-2 episode read from shards: records with binary labels at the view size.
#[derive(Clone, Debug)]
pub struct ShardEpisode {
    pub class_id: ClassId,
    pub query: ProposalRecord,
    /// 1 = class, 255 = ignore (in training also novel-class pixels), 0 = else.
    pub query_label: Vec<u8>,
    pub supports: Vec<ProposalRecord>,
    /// 1 = class, 255 = ignore, 0 = else.
    pub support_labels: Vec<Vec<u8>>,
}

/// The stage-2 dataset: training episodes over the augmented views of one shard folder, test
/// episodes over the test views of another. Reads payloads only; no model weights.
pub struct ShardDataset<'a> {
    reader: &'a ShardReader,
    sampler: Option<ShardEpisodeSampler>,
}

impl<'a> ShardDataset<'a> {
    /// Training episodes of `shot` supports (the fold's `novel` classes held out).
    pub fn train(reader: &'a ShardReader, novel: &[ClassId], shot: usize, seed: u64, min_support_area: f64) -> Result<Self> {
        let sampler = ShardEpisodeSampler::new(reader.records(), novel, shot, seed, min_support_area)?;
        Ok(Self { reader, sampler: Some(sampler) })
    }

    /// Test episodes by image id over the test views.
    pub fn test(reader: &'a ShardReader) -> Self {
        Self { reader, sampler: None }
    }

    pub fn sampler(&self) -> Option<&ShardEpisodeSampler> {
        self.sampler.as_ref()
    }

    /// Training episode `n`.
    pub fn episode(&self, n: u64) -> Result<ShardEpisode> {
        let sampler = self.sampler.as_ref().ok_or_else(|| DataError::Config("test shard dataset has no training sampler".into()))?;
        let spec = sampler.episode(n)?;
        // The sampler's classes come from the 8-bit class lists of the index.
        let class = narrow_class_id(spec.class_id, || format!("training episode {n}"))?;
        let query = self.reader.get_at(spec.query)?;
        let query_label = binary_label(&query.label, class, &sampler.novel);
        let supports = spec.supports.iter().map(|&i| self.reader.get_at(i)).collect::<std::result::Result<Vec<_>, _>>()?;
        let support_labels = supports.iter().map(|s| binary_label(&s.label, class, &[])).collect();
        Ok(ShardEpisode { class_id: spec.class_id, query, query_label, supports, support_labels })
    }

    /// Test episode `i` of `episodes` (ids of the val split, test views).
    pub fn test_episode(&self, episodes: &TestEpisodes, i: usize) -> Result<ShardEpisode> {
        let e = episodes.episodes.get(i).ok_or_else(|| DataError::BadEpisodes {
            source_name: episodes.dataset.clone(),
            reason: format!("episode {i} out of range (len {})", episodes.len()),
        })?;
        let get = |id: &str| -> Result<ProposalRecord> {
            self.reader.get(id, ShardView::Test).map_err(|e| match e {
                ShardError::NoRecord { .. } => DataError::BadEpisodes {
                    source_name: episodes.dataset.clone(),
                    reason: format!("image `{id}` has no cached test view in this shard folder (cache the val split)"),
                },
                other => other.into(),
            })
        };
        // Episodes may come from a file; an id no cached label can hold is refused, not wrapped.
        let class = narrow_class_id(e.class_id, || format!("{}: episode {i}", episodes.dataset))?;
        let query = get(&e.query)?;
        let query_label = binary_label(&query.label, class, &[]);
        let supports = e.supports[..episodes.shot].iter().map(|id| get(id)).collect::<Result<Vec<_>>>()?;
        let support_labels = supports.iter().map(|s| binary_label(&s.label, class, &[])).collect();
        Ok(ShardEpisode { class_id: e.class_id, query, query_label, supports, support_labels })
    }
}
