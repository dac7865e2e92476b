//! The toy world's scene generator: determinism, masks against pixels, captions against
//! scenes, unnamed appearances never nameable, and the `disendiff toy scenes` command.

use disendiff::toyworld::*;
use disendiff::util::seeded_rng;
use std::path::{Path, PathBuf};
use std::process::Command;

fn training_scenes(n: u64, seed: u64) -> Vec<Scene> {
    (0..n).map(|i| random_scene(&mut seeded_rng(scene_seed(seed, i)), &WorldSpec::default())).collect()
}

fn personalization_scenes(n: u64) -> Vec<Scene> {
    (0..n).map(|i| personalization_scene(scene_seed(7, i))).collect()
}

fn px(img: &image::RgbImage, x: u32, y: u32) -> Rgb {
    img.get_pixel(x, y).0
}

#[test]
fn same_seed_same_scene_and_pixels() {
    for (a, b) in training_scenes(50, 3).iter().zip(training_scenes(50, 3)) {
        assert_eq!(*a, b);
        let (ra, rb) = (render(a), render(&b));
        assert_eq!(ra.image.as_raw(), rb.image.as_raw());
        assert_eq!(ra.index.as_raw(), rb.index.as_raw());
    }
    assert_eq!(personalization_scene(11), personalization_scene(11));
    assert_ne!(training_scenes(5, 3), training_scenes(5, 4));
    assert_ne!(personalization_scene(11), personalization_scene(12));
}

#[test]
fn training_scenes_follow_the_world_rules() {
    let scenes = training_scenes(600, 1);
    let mut counts = [0usize; 4];
    let mut seen = std::collections::HashSet::new();
    for s in &scenes {
        assert!((1..=3).contains(&s.objects.len()));
        counts[s.objects.len()] += 1;
        seen.insert(s.background.word());
        for o in &s.objects {
            let Appearance::Named { color, pattern } = &o.appearance else { panic!("unnamed look in training world") };
            assert!(o.appearance.contrasts_with(s.background), "{} on {}", o.appearance.id(), s.background);
            assert!(o.cx - o.size >= 0.0 && o.cx + o.size <= 64.0 && o.cy - o.size >= 0.0 && o.cy + o.size <= 64.0);
            assert!((8.0..=22.0).contains(&o.size), "size {}", o.size);
            seen.insert(o.class.word());
            seen.insert(color.word());
            seen.insert(pattern.word());
        }
        // Slight overlap at most.
        for (i, a) in s.objects.iter().enumerate() {
            for b in &s.objects[i + 1..] {
                let d = ((a.cx - b.cx).powi(2) + (a.cy - b.cy).powi(2)).sqrt();
                assert!(d >= 0.92 * (a.size + b.size) - 0.02, "objects too close: {d} for radii {} {}", a.size, b.size);
            }
        }
    }
    assert!(counts[1..].iter().all(|&c| c > 150), "object counts {counts:?}");
    let words = Class::ALL.iter().map(|c| c.word()).chain(NamedColor::OBJECT.iter().map(|c| c.word()));
    let words: Vec<&str> = words.chain(Pattern::ALL.iter().map(|p| p.word())).chain(["gray"]).collect();
    for w in words {
        assert!(seen.contains(w), "{w} never sampled");
    }
}

/// Every labelled pixel differs from the background; every unlabelled pixel is at least half
/// background; each object keeps most of its own area visible.
fn check_masks(scene: &Scene) {
    let r = render(scene);
    let bg = scene.background.rgb();
    let max_contrast =
        scene.objects.iter().flat_map(|o| o.appearance.tones()).map(|t| color_distance(t, bg)).fold(0.0, f32::max);
    assert_eq!(r.masks.len(), scene.objects.len());
    for (x, y, l) in r.index.enumerate_pixels() {
        let l = l[0] as usize;
        assert!(l <= scene.objects.len());
        for (k, m) in r.masks.iter().enumerate() {
            assert_eq!(m.get_pixel(x, y)[0], if l == k + 1 { 255 } else { 0 });
        }
        let d = color_distance(px(&r.image, x, y), bg);
        if l == 0 {
            assert!(d <= 0.5 * max_contrast + 2.0, "unmasked pixel ({x},{y}) is {d} from background in {scene:?}");
        } else {
            assert!(d >= 0.25 * MIN_CONTRAST, "masked pixel ({x},{y}) is only {d} from background in {scene:?}");
        }
    }
    // Away from objects (5x5 neighbourhood all background; star tips may reach a pixel or two
    // beyond the mask), pixels are exactly the background.
    for y in 2..62 {
        for x in 2..62 {
            let all_bg = (0..25).all(|i| r.index.get_pixel(x + i % 5 - 2, y + i / 5 - 2)[0] == 0);
            if all_bg {
                assert_eq!(px(&r.image, x, y), bg, "stray colour at ({x},{y})");
            }
        }
    }
    for (k, o) in scene.objects.iter().enumerate() {
        let alone = render(&Scene { background: scene.background, objects: vec![o.clone()] });
        let own = alone.masks[0].pixels().filter(|p| p[0] > 0).count();
        let visible = r.masks[k].pixels().filter(|p| p[0] > 0).count();
        assert!(own > 40, "object {k} too small: {own} px");
        assert!(visible as f32 >= 0.75 * own as f32, "object {k} mostly hidden: {visible} of {own}");
    }
}

#[test]
fn masks_cover_exactly_the_object_pixels() {
    for s in training_scenes(300, 2).iter().chain(&personalization_scenes(60)) {
        check_masks(s);
    }
}

#[test]
fn later_objects_hide_earlier_ones() {
    let look = |c| Appearance::named(c, Pattern::Plain);
    let o = |class, c, cx| Object { class, appearance: look(c), cx, cy: 32.0, size: 16.0, rotation: 0.0 };
    let scene = Scene {
        background: NamedColor::White,
        objects: vec![o(Class::Ball, NamedColor::Red, 24.0), o(Class::Box, NamedColor::Blue, 40.0)],
    };
    let r = render(&scene);
    // The box (drawn last) owns the overlap at x = 32..35.
    assert_eq!(r.index.get_pixel(33, 32)[0], 2);
    assert_eq!(px(&r.image, 33, 32), NamedColor::Blue.rgb());
    assert_eq!(r.index.get_pixel(20, 32)[0], 1);
    assert_eq!(px(&r.image, 20, 32), NamedColor::Red.rgb());
    // Anti-aliased edges: the ball's rim in row 20 (x = 12.9 and 35.1) is a blend of red and white.
    let pure = [NamedColor::Red.rgb(), NamedColor::White.rgb()];
    assert!(!pure.contains(&px(&r.image, 12, 20)), "no anti-aliased edge pixel: {:?}", px(&r.image, 12, 20));
    assert!(px(&r.image, 12, 20)[1] > 30 && px(&r.image, 12, 20)[1] < 245);
    let small = render_sized(&scene, 32);
    assert_eq!(small.image.dimensions(), (32, 32));
    assert_eq!(small.index.get_pixel(10, 16)[0], 1);
}

#[test]
fn captions_parse_back_to_the_scene() {
    for s in training_scenes(400, 5) {
        let text = caption(&s);
        let parsed = parse_caption(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(parsed.background, Some(s.background), "{text}");
        assert_eq!(parsed.objects.len(), s.objects.len(), "{text}");
        for (p, o) in parsed.objects.iter().zip(&s.objects) {
            assert!(p.matches(o), "{text}: {p:?} vs {o:?}");
        }
        let classes = parse_caption(&class_caption(&s)).unwrap();
        assert_eq!(classes.background, None);
        assert!(classes.objects.iter().zip(&s.objects).all(|(p, o)| p.class == o.class && p.color.is_none()));
        assert!(!text.contains("plain"), "{text}");
        assert!(!text.contains(" a orange"), "{text}");
    }
    let s = Scene {
        background: NamedColor::White,
        objects: vec![
            Object {
                class: Class::Ball,
                appearance: Appearance::named(NamedColor::Red, Pattern::Striped),
                cx: 16.0,
                cy: 16.0,
                size: 10.0,
                rotation: 0.0,
            },
            Object {
                class: Class::Box,
                appearance: Appearance::named(NamedColor::Blue, Pattern::Plain),
                cx: 48.0,
                cy: 48.0,
                size: 10.0,
                rotation: 0.0,
            },
        ],
    };
    assert_eq!(caption(&s), "a red striped ball and a blue box on a white background");
    assert_eq!(class_caption(&s), "a ball and a box");
    assert_eq!(object_phrase(&s.objects[0]), "red striped ball");
    assert!(parse_caption("a red ball on a pink background").is_err());
    assert!(parse_caption("a teal ball").is_err());
}

#[test]
fn every_caption_word_is_one_clip_token() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1-tiny/tokenizer");
    let tok = disendiff::model::tokenizer::ClipTokenizer::from_dir(&dir).unwrap();
    let words = Class::ALL.iter().map(|c| c.word()).chain(NamedColor::ALL.iter().map(|c| c.word()));
    for w in words.chain(Pattern::ALL.iter().map(|p| p.word())).chain(["a", "an", "and", "on", "background"]) {
        assert_eq!(tok.tokenize(w).len(), 1, "{w} is not a single CLIP token");
    }
}

#[test]
fn unnamed_appearances_are_never_nameable() {
    let named_tones: Vec<Rgb> = NamedColor::ALL.iter().flat_map(|c| [c.rgb(), c.shade()]).collect();
    let table = unnamed_appearances();
    let ids: std::collections::HashSet<_> = table.iter().map(|u| u.id.clone()).collect();
    assert_eq!(ids.len(), table.len(), "ids not unique");
    for u in &table {
        assert_eq!(unnamed_appearance(&u.id).as_ref(), Some(u));
        for c in u.colors {
            let d = named_tones.iter().map(|&t| color_distance(c, t)).fold(f32::MAX, f32::min);
            assert!(d >= 70.0, "{}: colour {c:?} only {d} from a named tone", u.id);
        }
        assert!(color_distance(u.colors[0], u.colors[1]) >= 100.0, "{}: colours too alike", u.id);
        // Rendered, it differs clearly from every named look of the same object.
        let ball = |appearance| Scene {
            background: NamedColor::Gray,
            objects: vec![Object { class: Class::Ball, appearance, cx: 32.0, cy: 32.0, size: 20.0, rotation: 0.0 }],
        };
        let ours = render(&ball(Appearance::Unnamed(u.clone())));
        for &c in NamedColor::ALL {
            for &p in Pattern::ALL {
                let other = render(&ball(Appearance::named(c, p)));
                let (mut sum, mut n) = (0.0, 0);
                for (x, y, m) in ours.masks[0].enumerate_pixels() {
                    if m[0] > 0 {
                        sum += color_distance(px(&ours.image, x, y), px(&other.image, x, y));
                        n += 1;
                    }
                }
                assert!(sum / n as f32 >= 60.0, "{} looks like {c} {p}: mean distance {}", u.id, sum / n as f32);
            }
        }
    }
}

#[test]
fn unnamed_share_adds_unnamed_looks_but_never_the_personalization_ones() {
    let spec = WorldSpec { unnamed_share: 0.25, ..WorldSpec::default() };
    let (mut unnamed, mut total) = (0usize, 0usize);
    let mut ids = std::collections::HashSet::new();
    for i in 0..600 {
        let s = random_scene(&mut seeded_rng(scene_seed(5, i)), &spec);
        let parsed = parse_caption(&caption(&s)).unwrap();
        for (o, p) in s.objects.iter().zip(&parsed.objects) {
            total += 1;
            assert!(o.appearance.contrasts_with(s.background));
            if let Appearance::Unnamed(u) = &o.appearance {
                unnamed += 1;
                ids.insert(u.id.clone());
                assert!(!is_personalization_look(u), "{} is a personalization look", u.id);
                assert!(p.color.is_none() && p.pattern.is_none(), "unnamed look named in {}", caption(&s));
                assert!(u.colors.iter().all(|c| UNNAMED_PALETTE.iter().any(|(_, p)| p == c)));
            }
        }
    }
    let share = unnamed as f64 / total as f64;
    assert!((0.2..0.3).contains(&share), "unnamed share {share}");
    assert!(ids.len() > 100, "only {} different unnamed looks", ids.len());
    // Every personalization look is recognised whichever way round its colours are.
    for u in unnamed_appearances() {
        let swapped = UnnamedAppearance { colors: [u.colors[1], u.colors[0]], ..u.clone() };
        assert!(is_personalization_look(&u) && is_personalization_look(&swapped));
    }
    // A share of 1 leaves no named object.
    let all = WorldSpec { unnamed_share: 1.0, ..WorldSpec::default() };
    for i in 0..50 {
        let s = random_scene(&mut seeded_rng(scene_seed(6, i)), &all);
        assert!(s.objects.iter().all(|o| matches!(o.appearance, Appearance::Unnamed(_))));
    }
}

#[test]
fn personalization_scenes_are_two_unnamed_objects() {
    let mut used = std::collections::HashSet::new();
    for s in personalization_scenes(200) {
        assert_eq!(s.objects.len(), 2);
        let (a, b) = (&s.objects[0], &s.objects[1]);
        assert_ne!(a.class, b.class);
        let (Appearance::Unnamed(ua), Appearance::Unnamed(ub)) = (&a.appearance, &b.appearance) else {
            panic!("named look")
        };
        assert_ne!(ua.id, ub.id);
        assert!(ua.colors.iter().all(|c| !ub.colors.contains(c)));
        used.insert(ua.id.clone());
        assert!(a.appearance.contrasts_with(s.background) && b.appearance.contrasts_with(s.background));
        assert!((13.0..=16.0).contains(&a.size) && (13.0..=16.0).contains(&b.size));
        let d = ((a.cx - b.cx).powi(2) + (a.cy - b.cy).powi(2)).sqrt();
        assert!(d >= a.size + b.size + 3.0 - 0.02, "too close: {d}");
        let pc = personalization_caption(&s);
        assert_eq!(pc, format!("<new1> {} and <new2> {}", a.class, b.class));
        // The training-world caption names only the classes.
        let parsed = parse_caption(&caption(&s)).unwrap();
        assert!(parsed.objects.iter().all(|p| p.color.is_none() && p.pattern.is_none()));
        assert!(parsed.objects.iter().zip(&s.objects).all(|(p, o)| p.matches(o)));
    }
    assert_eq!(used.len(), unnamed_appearances().len(), "some unnamed looks never used");
}

// ---- the command line ----

fn disendiff(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_disendiff")).args(args).output().expect("run disendiff");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "disendiff panicked:\n{stderr}");
    (out.status.success(), stderr)
}

fn scenes_cmd(out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["toy", "scenes", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    disendiff(&args)
}

fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn cli_writes_scenes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a/b");
    let (ok, err) = scenes_cmd(&out, &["--n", "4", "--seed", "9"]);
    assert!(ok, "{err}");
    let names: Vec<String> = folder_bytes(&out).into_iter().map(|f| f.0).collect();
    let mut expected: Vec<String> =
        (0..4).flat_map(|i| [format!("{i:05}.png"), format!("{i:05}.txt"), format!("{i:05}.mask.png")]).collect();
    expected.push("scenes.jsonl".into());
    expected.sort();
    assert_eq!(names, expected, "no stray or temporary files");
    let records = read_records(&out).unwrap();
    assert_eq!(records.len(), 4);
    for (i, r) in records.iter().enumerate() {
        let scene = r.scene();
        assert_eq!(scene, random_scene(&mut seeded_rng(scene_seed(9, i as u64)), &WorldSpec::default()));
        let txt = std::fs::read_to_string(out.join(format!("{i:05}.txt"))).unwrap();
        assert_eq!(txt.trim_end(), caption(&scene));
        assert_eq!(r.caption, caption(&scene));
        let img = image::open(out.join(&r.image)).unwrap().to_rgb8();
        assert_eq!(img.as_raw(), render(&scene).image.as_raw());
        let mask = image::open(out.join(&r.mask)).unwrap();
        assert!(matches!(mask, image::DynamicImage::ImageLuma8(_)), "mask is not 8-bit gray");
        assert_eq!(mask.to_luma8().as_raw(), render(&scene).index.as_raw());
        for (k, o) in r.objects.iter().enumerate() {
            assert_eq!(o.mask_index as usize, k + 1);
            let n = mask.to_luma8().pixels().filter(|p| p[0] as usize == k + 1).count();
            assert_eq!(o.visible_pixels as usize, n);
        }
    }
    // Same command, same bytes; a longer run starts with the same scenes.
    let again = tmp.path().join("again");
    assert!(scenes_cmd(&again, &["--n", "4", "--seed", "9"]).0);
    assert_eq!(folder_bytes(&out), folder_bytes(&again));
    let longer = tmp.path().join("longer");
    assert!(scenes_cmd(&longer, &["--n", "6", "--seed", "9"]).0);
    assert_eq!(std::fs::read(out.join("00003.png")).unwrap(), std::fs::read(longer.join("00003.png")).unwrap());
}

#[test]
fn cli_personalization_and_size() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p");
    let (ok, err) = scenes_cmd(&out, &["--n", "3", "--personalization", "--size", "32"]);
    assert!(ok, "{err}");
    for r in read_records(&out).unwrap() {
        let txt = std::fs::read_to_string(out.join(format!("{:05}.txt", r.index))).unwrap();
        assert!(txt.starts_with("<new1> ") && txt.contains(" and <new2> "), "{txt}");
        assert_eq!(r.personalization_caption.as_deref(), Some(txt.trim_end()));
        assert!(r.objects.iter().all(|o| matches!(o.object.appearance, Appearance::Unnamed(_))));
        assert_eq!(image::open(out.join(&r.image)).unwrap().to_rgb8().dimensions(), (32, 32));
    }
}

#[test]
fn cli_rejects_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let (ok, err) = scenes_cmd(&out, &["--n", "0"]);
    assert!(!ok && err.contains("--n must be at least 1"), "{err}");
    assert!(!out.exists(), "folder created for a failed run");
    let (ok, err) = scenes_cmd(&out, &["--n", "2", "--max-objects", "4"]);
    assert!(!ok && err.contains("--max-objects"), "{err}");
    let (ok, err) = scenes_cmd(&out, &["--n", "2", "--size", "0"]);
    assert!(!ok && err.contains("--size"), "{err}");
    let (ok, err) = scenes_cmd(&out, &["--n", "2", "--unnamed-share", "1.5"]);
    assert!(!ok && err.contains("--unnamed-share"), "{err}");
    let (ok, err) = disendiff(&["toy", "scenes", "--n", "2"]);
    assert!(!ok && err.contains("--out"), "{err}");
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let (ok, err) = scenes_cmd(&file, &["--n", "2"]);
    assert!(!ok && err.contains("not a folder"), "{err}");
    let (ok, err) = scenes_cmd(&file.join("sub"), &["--n", "2"]);
    assert!(!ok && err.contains("creating output folder"), "{err}");
}

/// `cargo test --release --test toyworld_scenes -- --ignored contact_sheet`: 16 training and 4
/// personalization scenes, 4x upscaled, each beside its colour-coded mask, in
/// `$TOYWORLD_SHEET` (default /tmp/toyworld_sheet.png).
#[test]
#[ignore]
fn contact_sheet() {
    let mut scenes = training_scenes(16, 0);
    scenes.extend(personalization_scenes(4));
    let (cell, gap, cols) = (256u32, 6u32, 4u32);
    let rows = (scenes.len() as u32).div_ceil(cols);
    let mut sheet =
        image::RgbImage::from_pixel(cols * (2 * cell + 3 * gap), rows * (cell + gap) + gap, image::Rgb([90, 60, 60]));
    let palette = [[0u8, 0, 0], [255, 80, 80], [80, 255, 80], [80, 80, 255]];
    for (i, s) in scenes.iter().enumerate() {
        let r = render(s);
        let (x0, y0) = ((i as u32 % cols) * (2 * cell + 3 * gap) + gap, (i as u32 / cols) * (cell + gap) + gap);
        for y in 0..cell {
            for x in 0..cell {
                sheet.put_pixel(x0 + x, y0 + y, *r.image.get_pixel(x / 4, y / 4));
                let l = r.index.get_pixel(x / 4, y / 4)[0] as usize;
                sheet.put_pixel(x0 + cell + gap + x, y0 + y, image::Rgb(palette[l]));
            }
        }
        println!(
            "{i:2}: {}{}",
            caption(s),
            if i >= 16 { format!("  [{}]", personalization_caption(s)) } else { String::new() }
        );
    }
    let path = std::env::var("TOYWORLD_SHEET").unwrap_or("/tmp/toyworld_sheet.png".into());
    sheet.save(&path).unwrap();
}
