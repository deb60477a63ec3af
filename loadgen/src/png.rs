//! A latency CDF drawn into pixels and written as a PNG (uncompressed deflate: a plot of a few
//! hundred kilobytes needs no compression library).

const WIDTH: usize = 800;
const HEIGHT: usize = 500;
const MARGIN: usize = 50;

/// Plots the empirical CDFs of `series` (sorted values in ms, and a colour each) on a shared
/// x axis from 0 to the largest value; grid lines every tenth of each axis.
pub fn cdf_plot(series: &[(&[f64], [u8; 3])]) -> Vec<u8> {
    let mut pixels = vec![255u8; WIDTH * HEIGHT * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < WIDTH && y < HEIGHT {
            let i = (y * WIDTH + x) * 3;
            pixels[i..i + 3].copy_from_slice(&c);
        }
    };
    let (x0, y0) = (MARGIN, HEIGHT - MARGIN);
    let (w, h) = (WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN);
    for k in 0..=10 {
        let grey = if k == 0 { [0, 0, 0] } else { [225, 225, 225] };
        for x in x0..=x0 + w {
            put(x, y0 - h * k / 10, grey);
        }
        for y in y0 - h..=y0 {
            put(x0 + w * k / 10, y, grey);
        }
    }
    let max = series
        .iter()
        .filter_map(|(v, _)| v.last().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    for (values, colour) in series {
        if values.is_empty() {
            continue;
        }
        let n = values.len() as f64;
        let (mut last_x, mut last_y) = (x0, y0);
        for (i, v) in values.iter().enumerate() {
            let x = x0 + ((v / max) * w as f64).round() as usize;
            let y = y0 - (((i + 1) as f64 / n) * h as f64).round() as usize;
            // A step: along at the old height, then up.
            for xx in last_x..=x {
                put(xx, last_y, *colour);
                put(xx, last_y + 1, *colour);
            }
            for yy in y..=last_y.max(y) {
                put(x, yy, *colour);
                put(x + 1, yy, *colour);
            }
            (last_x, last_y) = (x, y);
        }
    }
    // Axis labels: milliseconds under the x grid, percent beside the y grid.
    for k in (0..=10).step_by(2) {
        let label = format!("{:.0}", max * k as f64 / 10.0);
        text(&mut put, x0 + w * k / 10, y0 + 8, &label, true);
        let label = format!("{}%", k * 10);
        text(&mut put, 4, y0 - h * k / 10 - 3, &label, false);
    }
    text(&mut put, x0 + w / 2 - 8, y0 + 22, "ms", false);
    encode(WIDTH, HEIGHT, &pixels)
}

/// 3x5 digits, '%', 'm', 's', '.', each row three bits (high bit left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '%' => [5, 1, 2, 4, 5],
        'm' => [0, 0, 7, 7, 5],
        's' => [0, 3, 6, 1, 6],
        '.' => [0, 0, 0, 0, 2],
        _ => return None,
    })
}

/// Draws `s` at (x, y), two pixels per dot; centred on x when `centre`.
fn text(put: &mut impl FnMut(usize, usize, [u8; 3]), x: usize, y: usize, s: &str, centre: bool) {
    let width = s.chars().count() * 8;
    let mut x = if centre {
        x.saturating_sub(width / 2)
    } else {
        x
    };
    for c in s.chars() {
        if let Some(rows) = glyph(c) {
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            put(x + col * 2 + dx, y + r * 2 + dy, [0, 0, 0]);
                        }
                    }
                }
            }
        }
        x += 8;
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Encodes 8-bit RGB pixels as a PNG.
pub fn encode(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((width * 3 + 1) * height);
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    // zlib stream of stored deflate blocks.
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&(width as u32).to_be_bytes());
    header.extend_from_slice(&(height as u32).to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &header);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_png_specification_example() {
        // CRC-32 of "IEND" is the well-known trailer of every PNG.
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn a_plot_is_a_png() {
        let png = cdf_plot(&[(&[1.0, 2.0, 3.0], [255, 0, 0])]);
        assert_eq!(&png[..8], &[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]);
        assert!(png.ends_with(&[0xae, 0x42, 0x60, 0x82]));
    }
}
