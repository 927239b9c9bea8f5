// The project's one preprocessing (pocus_edge/data/transforms.py), re-implemented for the page
// and checked against the golden vectors in the browser tests: pad bottom/right with zeros to a
// square, bilinear resize with half-pixel centres clamped at the edges, in float64, rows then
// columns, 8-bit outputs rounded half up. JavaScript numbers are IEEE float64 and never fused
// into multiply-adds, so the same operations in the same order give the same bits as NumPy.

export function bilinearTaps(nIn, nOut) {
  const i0 = new Int32Array(nOut);
  const i1 = new Int32Array(nOut);
  const w = new Float64Array(nOut);
  const scale = nIn / nOut;
  for (let i = 0; i < nOut; i++) {
    const pos = Math.min(Math.max((i + 0.5) * scale - 0.5, 0), nIn - 1);
    const f = Math.floor(pos);
    i0[i] = f;
    i1[i] = Math.min(f + 1, nIn - 1);
    w[i] = pos - f;
  }
  return { i0, i1, w };
}

// uint8 gray (height x width, row-major) -> uint8 size x size: transforms.preprocess_gray.
export function preprocessGray(gray, height, width, size) {
  const side = Math.max(height, width);
  const at = (y, x) => (y < height && x < width ? gray[y * width + x] : 0);
  const out = new Uint8Array(size * size);
  if (side === size) {
    for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) out[y * size + x] = at(y, x);
    return out;
  }
  const r = bilinearTaps(side, size);
  const rows = new Float64Array(size * side);
  for (let i = 0; i < size; i++) {
    const a = r.i0[i], b = r.i1[i], wb = r.w[i], wa = 1.0 - wb;
    for (let x = 0; x < side; x++) rows[i * side + x] = at(a, x) * wa + at(b, x) * wb;
  }
  const c = bilinearTaps(side, size);
  for (let i = 0; i < size; i++) {
    for (let j = 0; j < size; j++) {
      const v = rows[i * side + c.i0[j]] * (1.0 - c.w[j]) + rows[i * side + c.i1[j]] * c.w[j];
      out[i * size + j] = Math.min(Math.max(Math.floor(v + 0.5), 0), 255);
    }
  }
  return out;
}

// uint8 size x size gray -> float32 (3, size, size) in [0, 1]: transforms.preprocess_frame. The
// float64 quotient rounded to float32 equals float32 division (double rounding is exact here).
export function toModelInput(graySquare, size) {
  const plane = size * size;
  const out = new Float32Array(3 * plane);
  for (let k = 0; k < plane; k++) {
    const v = graySquare[k] / 255;
    out[k] = v;
    out[plane + k] = v;
    out[2 * plane + k] = v;
  }
  return out;
}

// Model-resolution map (size x size) -> frame resolution (height x width): bilinear to the padded
// square side, padding cropped (for display; the Python runtime uses OpenCV's float resize, which
// may differ in the last bits).
export function toFrameResolution(map, size, height, width) {
  const side = Math.max(height, width);
  const t = bilinearTaps(size, side);
  const out = new Float32Array(height * width);
  for (let y = 0; y < height; y++) {
    const a = t.i0[y], b = t.i1[y], wb = t.w[y], wa = 1.0 - wb;
    for (let x = 0; x < width; x++) {
      const c0 = t.i0[x], c1 = t.i1[x], wc = t.w[x];
      const top = map[a * size + c0] * (1 - wc) + map[a * size + c1] * wc;
      const bottom = map[b * size + c0] * (1 - wc) + map[b * size + c1] * wc;
      out[y * width + x] = top * wa + bottom * wb;
    }
  }
  return out;
}

// The model card (JSON under metadata key "pocus_edge_card") from the bytes of an ONNX file:
// ModelProto field 14 holds StringStringEntryProto {1: key, 2: value}. A minimal protobuf walk;
// null when absent.
export function readOnnxCard(bytes) {
  const view = new Uint8Array(bytes);
  let p = 0;
  const varint = () => {
    let result = 0, shift = 0, b;
    do {
      if (p >= view.length) throw new Error("truncated ONNX file");
      b = view[p++];
      result += (b & 0x7f) * 2 ** shift;
      shift += 7;
    } while (b & 0x80);
    return result;
  };
  const decoder = new TextDecoder();
  while (p < view.length) {
    const key = varint();
    const field = Math.floor(key / 8), wire = key & 7;
    if (wire === 0) varint();
    else if (wire === 1) p += 8;
    else if (wire === 5) p += 4;
    else if (wire === 2) {
      const length = varint();
      if (field === 14) {
        const end = p + length;
        let k = null, v = null;
        while (p < end) {
          const entryKey = varint();
          const len = varint();
          const text = decoder.decode(view.subarray(p, p + len));
          p += len;
          if (entryKey >> 3 === 1) k = text; else if (entryKey >> 3 === 2) v = text;
        }
        if (k === "pocus_edge_card" && v !== null) return JSON.parse(v);
      } else {
        p += length;
      }
    } else {
      throw new Error("not an ONNX model (unexpected protobuf wire type " + wire + ")");
    }
  }
  return null;
}
