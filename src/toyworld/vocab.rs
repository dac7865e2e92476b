//! The toy world's words and looks: object classes, named colours, named patterns, and the
//! unnamed appearances of the personalization scenes.

use serde::{Deserialize, Serialize};

/// An 8-bit RGB colour.
pub type Rgb = [u8; 3];

/// Least Euclidean RGB distance between every tone of an object and its background.
pub const MIN_CONTRAST: f32 = 80.0;

/// Euclidean distance between two colours in 8-bit RGB.
pub fn color_distance(a: Rgb, b: Rgb) -> f32 {
    a.iter().zip(b).map(|(&x, y)| (x as f32 - y as f32).powi(2)).sum::<f32>().sqrt()
}

fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [0, 1, 2].map(|i| (a[i] as f32 * (1.0 - t) + b[i] as f32 * t).round() as u8)
}

/// Defines a word enum: variants, `ALL`, `word()` and `from_word()`.
macro_rules! word_enum {
    ($(#[$m:meta])* $name:ident { $($v:ident = $w:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($v),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The caption word (a single CLIP token).
            pub fn word(self) -> &'static str {
                match self { $($name::$v => $w),+ }
            }
            pub fn from_word(w: &str) -> Option<Self> {
                match w { $($w => Some($name::$v),)+ _ => None }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.word())
            }
        }
    };
}

word_enum! {
    /// Object classes: flat 2D shapes, each named by one CLIP token.
    Class {
        Ball = "ball", Box = "box", Star = "star", Ring = "ring",
        Heart = "heart", Cross = "cross", Triangle = "triangle",
    }
}

word_enum! {
    /// Named colours: object colours ([`NamedColor::OBJECT`]) and backgrounds
    /// ([`NamedColor::BACKGROUND`]).
    NamedColor {
        Red = "red", Green = "green", Blue = "blue", Yellow = "yellow", Purple = "purple",
        Orange = "orange", White = "white", Black = "black", Gray = "gray",
    }
}

word_enum! {
    /// Named patterns. `checked` stands for "checkered", which is two CLIP tokens.
    Pattern { Plain = "plain", Striped = "striped", Dotted = "dotted", Checked = "checked" }
}

impl NamedColor {
    /// The colours an object may have in the training world.
    pub const OBJECT: &'static [NamedColor] = &[
        NamedColor::Red,
        NamedColor::Green,
        NamedColor::Blue,
        NamedColor::Yellow,
        NamedColor::Purple,
        NamedColor::Orange,
        NamedColor::White,
        NamedColor::Black,
    ];
    /// The background colours.
    pub const BACKGROUND: &'static [NamedColor] = &[NamedColor::White, NamedColor::Gray, NamedColor::Black];

    pub fn rgb(self) -> Rgb {
        match self {
            NamedColor::Red => [220, 30, 30],
            NamedColor::Green => [30, 170, 50],
            NamedColor::Blue => [30, 70, 220],
            NamedColor::Yellow => [245, 215, 30],
            NamedColor::Purple => [140, 50, 190],
            NamedColor::Orange => [250, 130, 20],
            NamedColor::White => [245, 245, 245],
            NamedColor::Black => [20, 20, 20],
            NamedColor::Gray => [128, 128, 128],
        }
    }

    /// The second tone of this colour's striped/dotted/checked patterns: light colours
    /// darkened by 45%, the others half-way to white. A function of the colour alone, so the
    /// one colour word of a caption names both tones.
    pub fn shade(self) -> Rgb {
        match self {
            NamedColor::Yellow | NamedColor::Orange | NamedColor::White => mix(self.rgb(), [0, 0, 0], 0.45),
            _ => mix(self.rgb(), [255, 255, 255], 0.5),
        }
    }
}

/// How the two colours of an unnamed appearance are laid out on the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnnamedLayout {
    /// Diagonal stripes, as [`Pattern::Striped`].
    Striped,
    /// Dots of the second colour on the first, as [`Pattern::Dotted`].
    Dotted,
    /// A checkerboard, as [`Pattern::Checked`].
    Checked,
    /// Left half the first colour, right half the second (in the object's own frame).
    Split,
}

/// A look that no caption of the training world can name: two colours that are all far
/// (>= 70 in RGB) from every named colour and every named shade.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UnnamedAppearance {
    /// Stable identifier, e.g. `teal-maroon-checked`.
    pub id: String,
    pub colors: [Rgb; 2],
    pub layout: UnnamedLayout,
}

/// The colours of unnamed looks, each far from every named colour and shade.
pub const UNNAMED_PALETTE: [(&str, Rgb); 8] = [
    ("teal", [0, 140, 140]),
    ("maroon", [120, 10, 50]),
    ("navy", [20, 30, 110]),
    ("cyan", [0, 220, 220]),
    ("magenta", [230, 20, 160]),
    ("chartreuse", [150, 235, 60]),
    ("gold", [200, 160, 60]),
    ("pink", [255, 110, 210]),
];

fn layout_word(l: UnnamedLayout) -> &'static str {
    match l {
        UnnamedLayout::Striped => "striped",
        UnnamedLayout::Dotted => "dotted",
        UnnamedLayout::Checked => "checked",
        UnnamedLayout::Split => "split",
    }
}

/// The unnamed look `{first}-{second}-{layout}` of two palette colours.
fn unnamed_look(first: usize, second: usize, layout: UnnamedLayout) -> UnnamedAppearance {
    let (a, b) = (UNNAMED_PALETTE[first], UNNAMED_PALETTE[second]);
    UnnamedAppearance { id: format!("{}-{}-{}", a.0, b.0, layout_word(layout)), colors: [a.1, b.1], layout }
}

/// The unnamed appearances of the personalization scenes, in a fixed order.
pub fn unnamed_appearances() -> Vec<UnnamedAppearance> {
    use UnnamedLayout::*;
    // Indices into UNNAMED_PALETTE.
    let table: [(usize, usize, UnnamedLayout); 8] = [
        (0, 1, Checked), // teal-maroon-checked
        (3, 2, Striped), // cyan-navy-striped
        (6, 0, Split),   // gold-teal-split
        (4, 5, Dotted),  // magenta-chartreuse-dotted
        (7, 2, Split),   // pink-navy-split
        (5, 1, Striped), // chartreuse-maroon-striped
        (3, 4, Checked), // cyan-magenta-checked
        (6, 2, Dotted),  // gold-navy-dotted
    ];
    table.iter().map(|&(a, b, layout)| unnamed_look(a, b, layout)).collect()
}

/// Whether a look uses the same two colours and layout as one of the personalization looks
/// (in either order): such looks are kept out of the training world.
pub fn is_personalization_look(u: &UnnamedAppearance) -> bool {
    unnamed_appearances().iter().any(|p| {
        p.layout == u.layout && (p.colors == u.colors || p.colors == [u.colors[1], u.colors[0]])
    })
}

/// A random unnamed look for the training world: two different palette colours and a layout,
/// never one of the personalization looks, so those stay unseen by the base model.
pub fn random_unnamed_look<R: rand::Rng + ?Sized>(rng: &mut R) -> UnnamedAppearance {
    use UnnamedLayout::*;
    loop {
        let first = rng.random_range(0..UNNAMED_PALETTE.len());
        let second = rng.random_range(0..UNNAMED_PALETTE.len() - 1);
        let second = if second >= first { second + 1 } else { second };
        let layout = [Striped, Dotted, Checked, Split][rng.random_range(0..4)];
        let look = unnamed_look(first, second, layout);
        if !is_personalization_look(&look) {
            return look;
        }
    }
}

/// The unnamed appearance with this identifier.
pub fn unnamed_appearance(id: &str) -> Option<UnnamedAppearance> {
    unnamed_appearances().into_iter().find(|u| u.id == id)
}

/// What an object looks like.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Appearance {
    /// Describable in words: "red striped".
    Named { color: NamedColor, pattern: Pattern },
    /// Never named by a caption (personalization concepts).
    Unnamed(UnnamedAppearance),
}

impl Appearance {
    pub fn named(color: NamedColor, pattern: Pattern) -> Self {
        Appearance::Named { color, pattern }
    }

    /// The colours that appear on the object (one for plain).
    pub fn tones(&self) -> Vec<Rgb> {
        match self {
            Appearance::Named { color, pattern: Pattern::Plain } => vec![color.rgb()],
            Appearance::Named { color, .. } => vec![color.rgb(), color.shade()],
            Appearance::Unnamed(u) => u.colors.to_vec(),
        }
    }

    /// Whether every tone is at least [`MIN_CONTRAST`] from the background.
    pub fn contrasts_with(&self, background: NamedColor) -> bool {
        self.tones().iter().all(|&t| color_distance(t, background.rgb()) >= MIN_CONTRAST)
    }

    /// The caption words ("red", "striped"; "red" for plain; none for unnamed).
    pub fn words(&self) -> Vec<&'static str> {
        match self {
            Appearance::Named { color, pattern: Pattern::Plain } => vec![color.word()],
            Appearance::Named { color, pattern } => vec![color.word(), pattern.word()],
            Appearance::Unnamed(_) => vec![],
        }
    }

    /// A stable identifier: `red-striped`, `blue-plain`, or the unnamed id.
    pub fn id(&self) -> String {
        match self {
            Appearance::Named { color, pattern } => format!("{color}-{pattern}"),
            Appearance::Unnamed(u) => u.id.clone(),
        }
    }
}
