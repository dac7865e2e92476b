//! The evaluation prompts of the paper's ten datasets (the authors' evaluation kit), shipped as
//! data in `assets/eval-prompts/<name>.txt` and built into the binary: per dataset three sets,
//! `combined` (both concepts, `<new1>` and `<new2>`), `concept1` (`<new1>` only) and
//! `concept2` (`<new2>` only), one prompt per line under a `[set]` header, `#` comments.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// The dataset names, in the paper's order of the files.
pub const DATASETS: [&str; 10] =
    ["baby_toy", "cat_dog", "chair_lamp", "chair_vase", "cow_bird", "dog_pig", "horse_dog", "man_woman", "mother_child", "woman_dog"];

const BUILTIN: [&str; 10] = [
    include_str!("../../assets/eval-prompts/baby_toy.txt"),
    include_str!("../../assets/eval-prompts/cat_dog.txt"),
    include_str!("../../assets/eval-prompts/chair_lamp.txt"),
    include_str!("../../assets/eval-prompts/chair_vase.txt"),
    include_str!("../../assets/eval-prompts/cow_bird.txt"),
    include_str!("../../assets/eval-prompts/dog_pig.txt"),
    include_str!("../../assets/eval-prompts/horse_dog.txt"),
    include_str!("../../assets/eval-prompts/man_woman.txt"),
    include_str!("../../assets/eval-prompts/mother_child.txt"),
    include_str!("../../assets/eval-prompts/woman_dog.txt"),
];

/// The three prompt sets of one dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalPrompts {
    pub combined: Vec<String>,
    pub concept1: Vec<String>,
    pub concept2: Vec<String>,
}

impl EvalPrompts {
    /// A built-in dataset by name.
    pub fn builtin(name: &str) -> Result<Self> {
        let i = DATASETS
            .iter()
            .position(|&d| d == name)
            .with_context(|| format!("unknown dataset {name:?} (one of {})", DATASETS.join(", ")))?;
        Self::parse(BUILTIN[i], &format!("assets/eval-prompts/{name}.txt"))
    }

    /// A prompts file in the same format.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the `[set]`-headed format; every set must be present and non-empty.
    pub fn parse(text: &str, what: &str) -> Result<Self> {
        let (mut combined, mut concept1, mut concept2) = (Vec::new(), Vec::new(), Vec::new());
        let mut cur: Option<&mut Vec<String>> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                cur = Some(match h {
                    "combined" => &mut combined,
                    "concept1" => &mut concept1,
                    "concept2" => &mut concept2,
                    _ => bail!("{what} line {}: unknown set [{h}] (combined, concept1, concept2)", n + 1),
                });
                continue;
            }
            match cur.as_mut() {
                Some(v) => v.push(line.to_string()),
                None => bail!("{what} line {}: a prompt before any [set] header", n + 1),
            }
        }
        for (name, v) in [("combined", &combined), ("concept1", &concept1), ("concept2", &concept2)] {
            if v.is_empty() {
                bail!("{what}: the [{name}] set is missing or empty");
            }
        }
        Ok(Self { combined, concept1, concept2 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every built-in set parses, with the counts of the authors' files, and each set uses the
    /// tokens it is named for.
    #[test]
    fn builtin_datasets_have_three_consistent_sets() {
        let mut total = 0;
        for name in DATASETS {
            let p = EvalPrompts::builtin(name).unwrap();
            for (set, v, new1, new2) in [("combined", &p.combined, true, true), ("concept1", &p.concept1, true, false), ("concept2", &p.concept2, false, true)] {
                assert!((8..=12).contains(&v.len()), "{name} {set}: {} prompts", v.len());
                for prompt in v {
                    assert_eq!((prompt.contains("<new1>"), prompt.contains("<new2>")), (new1, new2), "{name} {set}: {prompt}");
                }
                total += v.len();
            }
        }
        assert_eq!(total, 303);
        assert_eq!(EvalPrompts::builtin("cat_dog").unwrap().combined[0], "Photo of a <new1> cat and <new2> dog");
        assert!(EvalPrompts::builtin("dog_cat").is_err());
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(EvalPrompts::parse("a prompt\n[combined]\nx", "f").is_err());
        assert!(EvalPrompts::parse("[combined]\nx\n[concept1]\ny", "f").unwrap_err().to_string().contains("concept2"));
        assert!(EvalPrompts::parse("[combined]\nx\n[other]\ny", "f").is_err());
    }
}
