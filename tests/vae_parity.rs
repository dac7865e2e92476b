//! The AutoencoderKL against diffusers on the tiny SD1/SD2 fixtures (goldens `vae.*`): posterior
//! mean and std of an encoded image, and a decoded latent, loaded through the strict loader.

mod common;

use candle_core::{DType, Device};
use disendiff::model::vae::{AutoencoderKL, VaeConfig};
use disendiff::model::weights::{component_weight_files, WeightStore};
use std::sync::Arc;

fn load(name: &str, cfg: &VaeConfig) -> anyhow::Result<(AutoencoderKL, Arc<WeightStore>)> {
    let dir = common::fixture(&format!("{name}-tiny/vae"));
    let files = component_weight_files(&dir, "diffusion_pytorch_model", None)?;
    let store = Arc::new(WeightStore::open(&files, DType::F32, &Device::Cpu)?);
    let vae = AutoencoderKL::new(store.root(), cfg)?;
    Ok((vae, store))
}

fn check(name: &str) {
    common::assert_kernel_switch_honoured();
    let cfg = VaeConfig::from_file(common::fixture(&format!("{name}-tiny/vae/config.json"))).unwrap();
    let (vae, store) = load(name, &cfg).unwrap();
    store.finish().unwrap();
    assert_eq!((vae.scaling_factor(), vae.shift_factor()), (0.18215, 0.0));
    let g = common::load_golden(name);

    let post = vae.encode(&g["vae.image"]).unwrap();
    for (what, got) in [("vae.mean", &post.mean), ("vae.std", &post.std)] {
        let err = common::rel_err(got, &g[what]);
        println!("{name}: {what} rel err {err:.3e}");
        assert!(err <= 1e-4, "{name}: {what} rel err {err}");
    }
    let noise = post.mean.ones_like().unwrap();
    let s = post.sample(&noise).unwrap();
    assert!(common::rel_err(&s, &(&g["vae.mean"] + &g["vae.std"]).unwrap()) <= 1e-4);

    let decoded = vae.decode(&g["vae.decode_in"]).unwrap();
    let err = common::rel_err(&decoded, &g["vae.decoded"]);
    println!("{name}: vae.decoded rel err {err:.3e}");
    assert!(err <= 1e-4, "{name}: vae.decoded rel err {err}");
}

#[test]
fn sd1_vae_matches_diffusers() {
    check("sd1");
}

#[test]
fn sd2_vae_matches_diffusers() {
    check("sd2");
}

#[test]
fn unsupported_block_type_is_an_error() {
    let json = r#"{"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [16, 32]}"#;
    let err = format!("{:#}", VaeConfig::from_json(json).unwrap_err());
    assert!(err.contains("AttnDownEncoderBlock2D"), "{err}");
    let cfg = VaeConfig { up_block_types: vec!["AttnUpDecoderBlock2D".into(); 4], ..VaeConfig::default() };
    let err = format!("{:#}", load("sd1", &cfg).err().expect("must fail"));
    assert!(err.contains("AttnUpDecoderBlock2D"), "{err}");
}

#[test]
fn config_weight_mismatches_are_errors() {
    let base = VaeConfig::from_file(common::fixture("sd1-tiny/vae/config.json")).unwrap();
    // One layer too many per block: a missing weight, named.
    let cfg = VaeConfig { layers_per_block: base.layers_per_block + 1, ..base.clone() };
    let err = format!("{:#}", load("sd1", &cfg).err().expect("must fail"));
    assert!(err.contains("resnets"), "{err}");
    // No mid-block attention: the attention weights stay unused and finish() says so.
    let cfg = VaeConfig { mid_block_add_attention: false, ..base };
    let (_, store) = load("sd1", &cfg).unwrap();
    let err = format!("{:#}", store.finish().unwrap_err());
    assert!(err.contains("mid_block.attentions.0"), "{err}");
}

/// Both VAEs again on the generic candle path (fused CPU kernels off, in a child process):
/// same tolerances.
#[test]
fn vaes_match_diffusers_with_kernels_off() {
    common::run_with_kernels_off(&["sd1_vae_matches_diffusers", "sd2_vae_matches_diffusers"]);
}

/// Tiled decoding (`enable_tiling`) against diffusers' `tiled_decode` on the same tiny VAE
/// (golden `vae-tiling.*`, tools/reference/make_vae_tiling_fixtures.py): 3 x 5 latent tiles
/// of 8 with 25% overlap. Without tiling the same latents give diffusers' one-piece decode, and
/// the two differ clearly (so a tiling that did nothing would fail).
#[test]
fn tiled_decode_matches_diffusers() {
    let cfg = VaeConfig::from_file(common::fixture("sd1-tiny/vae/config.json")).unwrap();
    assert_eq!(cfg.sample_size, 64);
    let (mut vae, _store) = load("sd1", &cfg).unwrap();
    let g = common::load_golden("vae-tiling");
    let whole = vae.decode(&g["latents"]).unwrap();
    let err_whole = common::rel_err(&whole, &g["whole"]);
    vae.enable_tiling();
    let tiled = vae.decode(&g["latents"]).unwrap();
    let err_tiled = common::rel_err(&tiled, &g["tiled"]);
    let apart = common::rel_err(&g["tiled"], &g["whole"]);
    println!("tiled rel err {err_tiled:.3e}, whole rel err {err_whole:.3e}, tiled vs whole {apart:.3e}");
    assert!(err_whole <= 1e-4 && err_tiled <= 1e-4, "tiled {err_tiled}, whole {err_whole}");
    assert!(apart > 1e-2, "the golden's tiled and whole decodes hardly differ ({apart})");
}
