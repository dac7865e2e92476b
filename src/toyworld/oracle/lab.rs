//! Colour arithmetic shared by the oracle's pieces: sRGB to CIE L*a*b* (the space where the
//! segmenter clusters tones and the appearance descriptor compares them, because Lab distances
//! follow perceived differences) and the Euclidean distance between two colours.

/// sRGB (0-255) to CIE L*a*b* (D65).
pub fn srgb_to_lab(c: [f32; 3]) -> [f32; 3] {
    let lin = |v: f32| {
        let v = (v / 255.0).clamp(0.0, 1.0);
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    let (r, g, b) = (lin(c[0]), lin(c[1]), lin(c[2]));
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883;
    let f = |t: f32| if t > 0.008856 { t.cbrt() } else { 7.787 * t + 16.0 / 116.0 };
    let (fx, fy, fz) = (f(x), f(y), f(z));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Euclidean distance between two colours (in whatever space both are given).
pub(super) fn dist3(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f32; 3], b: [f32; 3], tol: f32) -> bool {
        dist3(a, b) < tol
    }

    #[test]
    fn lab_of_reference_colours() {
        // Published CIE L*a*b* (D65) values of the sRGB primaries, white and black.
        assert!(close(srgb_to_lab([255.0, 255.0, 255.0]), [100.0, 0.0, 0.0], 0.05));
        assert!(close(srgb_to_lab([0.0, 0.0, 0.0]), [0.0, 0.0, 0.0], 1e-4));
        assert!(close(srgb_to_lab([255.0, 0.0, 0.0]), [53.24, 80.09, 67.20], 0.1));
        assert!(close(srgb_to_lab([0.0, 255.0, 0.0]), [87.73, -86.18, 83.18], 0.1));
        assert!(close(srgb_to_lab([0.0, 0.0, 255.0]), [32.30, 79.19, -107.86], 0.1));
        // A neutral grey has no chroma.
        let g = srgb_to_lab([119.0, 119.0, 119.0]);
        assert!(g[1].abs() < 0.05 && g[2].abs() < 0.05 && (g[0] - 50.0).abs() < 0.5, "{g:?}");
    }

    #[test]
    fn lab_clamps_out_of_range_inputs() {
        assert_eq!(srgb_to_lab([300.0, -5.0, 255.0]), srgb_to_lab([255.0, 0.0, 255.0]));
    }

    #[test]
    fn distance_is_euclidean() {
        assert_eq!(dist3([0.0, 0.0, 0.0], [3.0, 4.0, 12.0]), 13.0);
        assert_eq!(dist3([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]), 0.0);
    }
}
