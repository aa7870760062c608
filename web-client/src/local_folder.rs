//! `shoal-peer --local-data DIR`: a task on local data, trained on the files of a folder
//! of this machine, read and checked as the browser worker does — PNG images (labelled
//! by their folder's name or a `labels.csv`), CSV rows or UTF-8 text. A bad file is
//! skipped with its reason; nothing of the files leaves the machine.

use std::path::{Path, PathBuf};

use shoal_shared::local::{LocalData, LocalKind, MAX_IMAGE_PIXELS};
use shoal_shared::task::TaskSpec;

/// Deepest folder nesting read.
const MAX_DEPTH: usize = 8;
/// Most entries (files, and links and folders passed over) listed from a folder: a
/// task's file limit is at most 100,000, and a peer pointed at a home folder must not
/// list the whole tree into memory first.
const MAX_ENTRIES: usize = 250_000;

/// Reads every file under `dir` into the task's local data set.
pub fn read_folder(task: &TaskSpec, dir: &Path) -> Result<LocalData, String> {
    let mut data = LocalData::new(task)?;
    let mut files = Vec::new();
    let mut passed = Vec::new();
    walk(dir, 0, &mut files, &mut passed).map_err(|e| format!("{}: {e}", dir.display()))?;
    if files.len() + passed.len() > MAX_ENTRIES {
        files.truncate(MAX_ENTRIES.saturating_sub(passed.len()));
        passed.push((
            dir.to_path_buf(),
            format!("more than {MAX_ENTRIES} entries: the rest not listed"),
        ));
    }
    files.sort();
    let name_of = |p: &Path| {
        p.strip_prefix(dir)
            .unwrap_or(p)
            .to_string_lossy()
            .replace('\\', "/")
    };
    let images = data.kind() == LocalKind::Images;
    let is_table = |p: &Path| {
        images
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().eq_ignore_ascii_case("labels.csv"))
    };
    let (tables, rest): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|p| is_table(p));
    let (w, h) = data.image_size();
    for (path, why) in &passed {
        data.pass_over(&name_of(path), why.clone());
    }
    let all: Vec<&PathBuf> = tables.iter().chain(&rest).collect();
    for (i, path) in all.iter().enumerate() {
        if data.full() {
            data.not_read(all.len() - i);
            break;
        }
        let name = name_of(path);
        let size = std::fs::metadata(path).map_or(usize::MAX, |m| m.len() as usize);
        if !data.admit(&name, size) {
            continue;
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                data.skip(&name, format!("could not be read ({e})"));
                continue;
            }
        };
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        // Each call records its own outcome (a skipped file and its reason).
        let _ = match data.kind() {
            LocalKind::Images if is_table(path) => data.label_table(&name, &bytes).map(|_| ()),
            LocalKind::Images if ext == "png" => match grey_png(&bytes, w, h) {
                Ok(grey) => {
                    let folder = name
                        .rsplit_once('/')
                        .and_then(|(f, _)| f.rsplit('/').next());
                    data.add_image(&name, folder, &grey, w, h)
                }
                Err(e) => {
                    data.skip(&name, format!("not a readable PNG image ({e})"));
                    Ok(())
                }
            },
            LocalKind::Images if ext == "jpg" || ext == "jpeg" => {
                data.skip(
                    &name,
                    "JPEG is read in the browser; the native peer reads PNG (convert it)",
                );
                Ok(())
            }
            LocalKind::Images => {
                data.skip(&name, "not a PNG or JPEG image");
                Ok(())
            }
            LocalKind::Csv => data.add_csv(&name, &bytes),
            LocalKind::Text => data.add_text(&name, &bytes),
        };
    }
    Ok(data)
}

/// Lists the files under `dir` into `out`, and what it passed over (links, folders too
/// deep or unreadable) with the reason into `passed`, up to [`MAX_ENTRIES`] of both.
/// Only `dir` itself must be readable.
fn walk(
    dir: &Path,
    depth: usize,
    out: &mut Vec<PathBuf>,
    passed: &mut Vec<(PathBuf, String)>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        // One past the limit tells that the rest was left out.
        if out.len() + passed.len() > MAX_ENTRIES {
            break;
        }
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            passed.push((path, "could not be read".into()));
            continue;
        };
        if kind.is_symlink() {
            passed.push((path, "a link: not followed".into()));
        } else if kind.is_dir() && depth >= MAX_DEPTH {
            passed.push((path, format!("a folder deeper than {MAX_DEPTH}: not read")));
        } else if kind.is_dir() {
            if let Err(e) = walk(&path, depth + 1, out, passed) {
                passed.push((path, format!("a folder that could not be read ({e})")));
            }
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// A PNG as grey values at `width x height`: colour to luma, transparency over black
/// (as the browser's canvas does), then resampled bilinearly when its size differs.
fn grey_png(bytes: &[u8], width: usize, height: usize) -> Result<Vec<u8>, String> {
    let mut decoder =
        png::Decoder::new_with_limits(std::io::Cursor::new(bytes), png::Limits { bytes: 64 << 20 });
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    // The header's size is a claim: checked before anything that size is allocated.
    let (sw, sh) = reader.info().size();
    if u64::from(sw) * u64::from(sh) > MAX_IMAGE_PIXELS {
        return Err(format!(
            "{sw}x{sh} pixels, more than {MAX_IMAGE_PIXELS} (4096x4096)"
        ));
    }
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    let (sw, sh) = (info.width as usize, info.height as usize);
    let channels = info.color_type.samples();
    let luma = |p: &[u8]| -> f32 {
        let (v, a) = match p {
            [g] => (f32::from(*g), 255.0),
            [g, a] => (f32::from(*g), f32::from(*a)),
            [r, g, b] => (
                0.299 * f32::from(*r) + 0.587 * f32::from(*g) + 0.114 * f32::from(*b),
                255.0,
            ),
            [r, g, b, a, ..] => (
                0.299 * f32::from(*r) + 0.587 * f32::from(*g) + 0.114 * f32::from(*b),
                f32::from(*a),
            ),
            _ => (0.0, 255.0),
        };
        v * a / 255.0
    };
    let src: Vec<f32> = buf[..sw * sh * channels]
        .chunks_exact(channels)
        .map(luma)
        .collect();
    if sw == 0 || sh == 0 {
        return Err("an empty image".into());
    }
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        let fy = ((y as f32 + 0.5) * sh as f32 / height as f32 - 0.5).clamp(0.0, (sh - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(sh - 1);
        for x in 0..width {
            let fx =
                ((x as f32 + 0.5) * sw as f32 / width as f32 - 0.5).clamp(0.0, (sw - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(sw - 1);
            let top = src[y0 * sw + x0] * (1.0 - tx) + src[y0 * sw + x1] * tx;
            let bottom = src[y1 * sw + x0] * (1.0 - tx) + src[y1 * sw + x1] * tx;
            out.push((top * (1.0 - ty) + bottom * ty).round().clamp(0.0, 255.0) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(pixels: &[u8], w: u32, h: u32, color: png::ColorType) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = png::Encoder::new(&mut out, w, h);
        e.set_color(color);
        e.set_depth(png::BitDepth::Eight);
        e.write_header()
            .expect("header")
            .write_image_data(pixels)
            .expect("pixels");
        out
    }

    #[test]
    fn colour_and_transparency_become_grey_and_a_double_size_image_scales_back_exactly() {
        let grey: Vec<u8> = (0..28 * 28).map(|i| (i * 7 % 256) as u8).collect();
        // Each pixel doubled in both directions, as opaque RGBA.
        let mut rgba = Vec::new();
        for y in 0..56 {
            for x in 0..56 {
                let v = grey[(y / 2) * 28 + x / 2];
                rgba.extend_from_slice(&[v, v, v, 255]);
            }
        }
        let back = grey_png(&png(&rgba, 56, 56, png::ColorType::Rgba), 28, 28).expect("decodes");
        assert_eq!(back, grey);
        // Pure red at half transparency, over black: luma 0.299 * 255 * 0.5.
        let red =
            grey_png(&png(&[255, 0, 0, 128], 1, 1, png::ColorType::Rgba), 1, 1).expect("decodes");
        assert_eq!(red, vec![(0.299f32 * 255.0 * 128.0 / 255.0).round() as u8]);
    }

    /// Links (and folders too deep) are listed as skipped but are no files offered: a
    /// folder of as many links as the task's file limit used the limit up before the
    /// first real file was read, and nothing was trained on.
    #[cfg(unix)]
    #[test]
    fn links_in_a_folder_do_not_use_up_the_file_limit() {
        use shoal_shared::local::{LocalKind, LocalSpec};
        let dir = std::env::temp_dir().join(format!("shoal-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("3")).expect("dir");
        let grey = vec![128u8; 28 * 28];
        for name in ["a.png", "b.png"] {
            let bytes = png(&grey, 28, 28, png::ColorType::Grayscale);
            std::fs::write(dir.join("3").join(name), bytes).expect("png");
        }
        for i in 0..3 {
            std::os::unix::fs::symlink(dir.join("3/a.png"), dir.join(format!("0link{i}.png")))
                .expect("link");
        }
        let mut task = TaskSpec::digits();
        task.data.source = shoal_shared::task::DataSource::Local;
        task.data.train = shoal_shared::task::Files::default();
        task.data.local = Some(LocalSpec {
            kind: LocalKind::Images,
            max_files: 3,
            max_file_bytes: 4000,
            label_names: Vec::new(),
        });
        let data = read_folder(&task, &dir).expect("read");
        let summary = data.summary();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(summary.samples, 2, "{summary:?}");
        assert_eq!(
            summary
                .skipped
                .iter()
                .filter(|s| s.reason.contains("a link"))
                .count(),
            3,
            "{summary:?}"
        );
    }

    #[test]
    fn a_png_claiming_a_huge_size_is_refused_before_it_is_decoded() {
        // A valid header claiming 100,000 x 100,000 pixels, then nothing.
        let mut small = png(&[0], 1, 1, png::ColorType::Grayscale);
        // IHDR data starts at byte 16: width, height (big-endian), then its CRC at 29.
        small[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        small[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = {
            let mut c = 0xffff_ffffu32;
            for b in &small[12..29] {
                c ^= u32::from(*b);
                for _ in 0..8 {
                    c = if c & 1 == 1 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        small[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = grey_png(&small, 28, 28).expect_err("too large");
        assert!(e.contains("more than"), "{e}");
    }
}
