// liverlesion viewer: slices are rendered by the server (PNG); this page draws them, takes clicks
// and polls the classification jobs. No libraries, works offline. Research use, not for diagnosis.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = {
    study: null,        // the study's info from the server
    k: 0,               // current slice
    level: 60, width: 250,
    img: null,          // the current slice image
    wanted: "",         // URL of the slice last asked for (older answers are dropped)
    drag: null,         // {x, y, r} in image pixels while the mouse is down
    marker: null,       // last click {k, x, y, r}
    results: new Map(), // lesion_id -> row
    selected: null,
    classNames: [],
    rule: "",           // the decision rule, in words
    uploading: false,   // a CT is being uploaded / read
    running: false,     // a classification job is queued or running
    maxUpload: null,    // the server's upload limit in bytes (/api/info), checked before uploading
    hover: null,        // the voxel under the mouse {x, y} (pixel indices), null when off the slice
    huBusy: false,      // an HU request is in flight (one at a time: the latest position wins)
    huWanted: false,    // the mouse moved (or the slice changed) while it was in flight
  };

  // ------------------------------------------------------------------ helpers
  function showError(msg) {
    const e = $("error");
    e.textContent = msg || "";
    e.hidden = !msg;
  }
  // While a classification runs, the buttons that would start another one (or replace the study under
  // it) are off; a click on the slice says why nothing happens.
  function setControls() {
    $("open-button").disabled = state.uploading || state.running;
    $("classify-label").disabled = $("classify-all").disabled = state.running;
  }
  function busy(text) {
    $("busy").hidden = !text;
    $("busy-text").textContent = text || "";
  }
  function fmt(v, n) {
    if (v === null || v === undefined || v === "") return "-";
    if (typeof v === "number") return Number.isFinite(v) ? v.toFixed(n === undefined ? 3 : n) : "-";
    return String(v);
  }
  async function json(resp) {
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) throw new Error((body && body.error) || `HTTP ${resp.status}`);
    return body;
  }
  // fetch() only rejects when no answer came at all: say so in words, not the browser's "Failed to fetch".
  const OFFLINE = "the liverlesion server does not answer (stopped?); start liverlesion serve again and " +
    "reload this page (open studies are not kept across a restart)";
  const request = (url, opts) => fetch(url, opts).catch(() => { throw new Error(OFFLINE); });
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const api = (path) => `/api/studies/${encodeURIComponent(state.study.study_id)}${path}`;

  // ------------------------------------------------------------------ model info
  request("/api/info").then(json).then((info) => {
    state.classNames = info.class_names || [];
    const models = (info.models || []).map((m) => `${m.backbone || "?"} (sha256 ${String(m.sha256 || "?").slice(0, 12)})`);
    $("model-info").textContent = `Model: ${models.join(", ")}; classes ${state.classNames.join(", ")}; ` +
      `decision: ${info.decision_rule}; liverlesion ${info.liverlesion_version}.`;
    state.rule = info.decision_rule || "";
    state.maxUpload = Number.isFinite(info.max_upload_bytes) ? info.max_upload_bytes : null;
    showRule();
  }).catch((e) => showError(`model info: ${e.message}`));

  // ------------------------------------------------------------------ opening a study
  // Python's "{:.1f}" and "{:g}", so the page's refusal reads as the server's 413, word for word.
  function pyFixed1(v) {
    if (Number.isInteger(v * 4) && !Number.isInteger(v * 2)) { // x.25, x.75: a tie, Python keeps the even digit
      const f = Math.floor(v * 10);
      return ((f % 2 === 0 ? f : f + 1) / 10).toFixed(1);
    }
    return v.toFixed(1);
  }
  function pyG(v) {
    if (v === 0) return "0";
    const [m, e] = v.toExponential(5).split("e");
    const exp = Number(e);
    const strip = (s) => (s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s);
    if (exp >= -4 && exp < 6) return strip(v.toFixed(5 - exp));
    return `${strip(m)}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  // as server.py's too_large_message (keep the two in step)
  const tooLarge = (length, limit) => `upload of ${pyFixed1(length / 1e6)} MB: over the server's limit of ` +
    `${pyFixed1(limit / 1e6)} MB; upload a smaller file (e.g. a NIfTI of the series) or restart the server ` +
    `with a larger --max-upload-mb (now ${pyG(limit / 1024 ** 2)})`;

  $("open-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    showError("");
    const data = new FormData();
    const image = $("image-file").files[0];
    if (!image) { showError("CT file: none chosen; choose a NIfTI or a .zip of one DICOM series"); return; }
    data.append("image", image, image.name);
    const mask = $("mask-file").files[0];
    if (mask) data.append("mask", mask, mask.name);
    const segments = $("seg-label").value.trim();
    if (segments) data.append("label", segments);
    // Refused here, before a long upload the server would refuse from its size alone.
    const size = image.size + (mask ? mask.size : 0);
    if (state.maxUpload !== null && size > state.maxUpload) { showError(tooLarge(size, state.maxUpload)); return; }
    const xhr = new XMLHttpRequest();
    $("open-progress").hidden = false;
    state.uploading = true;
    setControls();
    $("upload-bar").value = 0;
    $("open-status").textContent = "uploading…";
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) $("upload-bar").value = (100 * e.loaded) / e.total;
    };
    xhr.upload.onload = () => {
      $("upload-bar").removeAttribute("value"); // indeterminate while the server reads the CT
      $("open-status").textContent = "reading the CT on the server…";
    };
    xhr.onloadend = () => {
      state.uploading = false;
      setControls();
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
      if (xhr.status !== 201) {
        $("open-progress").hidden = true;
        showError((body && body.error) || (xhr.status ? `upload failed (HTTP ${xhr.status})` : OFFLINE));
        return;
      }
      $("open-status").textContent = `opened: ${body.n_slices} slices`;
      $("upload-bar").value = 100;
      setStudy(body);
    };
    xhr.open("POST", "/api/studies");
    xhr.send(data);
  });

  function setStudy(info) {
    state.study = info;
    state.results.clear();
    state.selected = null;
    state.marker = null;
    leaveSlice();
    renderTable();
    $("latest-result").textContent = "No lesion classified yet.";
    $("overlay-figure").hidden = true;
    $("view").hidden = false;
    const [nz, ny, nx] = info.shape_zyx;
    const [, sy, sx] = info.spacing_zyx_mm;
    const scale = Math.min(2, 640 / nx);
    const canvas = $("slice-canvas");
    canvas.width = Math.round(nx * scale);
    canvas.height = Math.round(ny * scale * (sy / sx));
    $("slice-range").max = String(nz - 1);
    const sel = $("mask-lesion");
    sel.innerHTML = "";
    for (const l of info.mask_lesions || []) {
      const o = document.createElement("option");
      o.value = String(l.label);
      const seg = l.segment_label ? ` “${l.segment_label}”` : "";
      o.textContent = `label ${l.label}${seg} (${l.lesion_id}), slices ${l.first_slice + 1}–${l.last_slice + 1}`;
      sel.appendChild(o);
    }
    $("mask-tools").hidden = !(info.mask_lesions || []).length;
    setDownloads();
    goTo(info.start_slice);
    canvas.focus();
  }

  // ------------------------------------------------------------------ slices
  // Slices are numbered from 1 on the page, as a PACS numbers them, with their z (LPS mm) to match them
  // by position; the API's slice index and centre_slice in the downloads count from 0 (slice 1 = index 0).
  function sliceName(k) {
    const s = state.study;
    const z = (s.slice_z_mm || [])[k];
    const dz = Math.abs(s.spacing_zyx_mm[0]);
    const where = Number.isFinite(z) ? `, z = ${fmt(z, dz >= 0.5 ? 1 : 2)} mm` : "";
    return `slice ${k + 1} of ${s.n_slices}${where}`;
  }
  function goTo(k) {
    if (!state.study) return;
    const nz = state.study.n_slices;
    state.k = Math.max(0, Math.min(nz - 1, Math.round(k)));
    $("slice-range").value = String(state.k);
    $("slice-number").textContent = sliceName(state.k);
    loadSlice();
    askHU();
  }
  function loadSlice() {
    const o = $("outline").checked ? 1 : 0;
    const url = api(`/slice/${state.k}.png?wl=${state.level}&ww=${state.width}&outline=${o}`);
    state.wanted = url;
    const img = new Image();
    img.onload = () => {
      if (state.wanted !== url) return; // an older slice arriving late
      state.img = img;
      draw();
    };
    img.onerror = () => {
      if (state.wanted !== url) return;
      request(url).then(json).catch((e) => showError(`slice ${state.k + 1}: ${e.message}`));
    };
    img.src = url;
  }
  function draw() {
    const c = $("slice-canvas");
    const g = c.getContext("2d");
    g.imageSmoothingEnabled = false;
    g.fillStyle = "#000";
    g.fillRect(0, 0, c.width, c.height);
    if (state.img) g.drawImage(state.img, 0, 0, c.width, c.height);
    const m = state.drag || (state.marker && state.marker.k === state.k ? state.marker : null);
    if (m) {
      const [, ny, nx] = state.study.shape_zyx;
      const px = ((m.x + 0.5) / nx) * c.width, py = ((m.y + 0.5) / ny) * c.height;
      g.strokeStyle = "#ff3030";
      g.lineWidth = 1.5;
      g.beginPath();
      g.moveTo(px - 6, py); g.lineTo(px + 6, py); g.moveTo(px, py - 6); g.lineTo(px, py + 6);
      g.stroke();
      if (m.rmm > 0) {
        const [, sy, sx] = state.study.spacing_zyx_mm;
        g.beginPath();
        g.ellipse(px, py, (m.rmm / sx / nx) * c.width, (m.rmm / sy / ny) * c.height, 0, 0, 2 * Math.PI);
        g.stroke();
      }
    }
  }
  $("slice-range").addEventListener("input", (e) => goTo(Number(e.target.value)));
  $("slice-canvas").addEventListener("wheel", (e) => {
    e.preventDefault();
    goTo(state.k + (e.deltaY > 0 ? -1 : 1));
  }, { passive: false });
  // Slice keys work wherever the focus is (after a click on a table row or a button too), except in
  // the page's own fields and lists, which keep their arrow keys.
  document.addEventListener("keydown", (e) => {
    if (!state.study || $("view").hidden || e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.target.closest && e.target.closest("input, select, textarea")) return;
    const nz = state.study.n_slices;
    const to = {
      ArrowUp: state.k + 1, ArrowDown: state.k - 1, PageUp: state.k + 10, PageDown: state.k - 10,
      Home: 0, End: nz - 1,
    }[e.key];
    if (to !== undefined) { e.preventDefault(); goTo(to); }
  });
  $("outline").addEventListener("change", loadSlice);
  function setWindow() {
    const p = $("preset").value;
    const custom = p === "custom";
    $("level").disabled = $("width").disabled = !custom;
    if (!custom && state.study) {
      const w = state.study.presets[p];
      $("level").value = w.level;
      $("width").value = w.width;
    }
    const level = Number($("level").value), width = Number($("width").value);
    const bad = !Number.isFinite(level) || !Number.isFinite(width) || width < 1 ||
      $("level").value.trim() === "" || $("width").value.trim() === "";
    if (bad) {
      showError("window: level must be a number of HU and width at least 1 HU (e.g. L 60, W 250)");
      return;
    }
    if ($("error").textContent.startsWith("window:")) showError(""); // fixed: the old complaint goes
    state.level = level;
    state.width = width;
    if (state.study) loadSlice();
  }
  $("preset").addEventListener("change", setWindow);
  $("level").addEventListener("change", setWindow);
  $("width").addEventListener("change", setWindow);

  // ------------------------------------------------------------------ HU under the mouse
  // One small request at a time (GET .../hu), at most every 40 ms; a move while one is in flight asks
  // again for the latest position when it returns, so the readout follows the mouse without a queue.
  function leaveSlice() {
    state.hover = null;
    $("hu-readout").textContent = "Move the mouse over the slice for its HU.";
  }
  function askHU() {
    if (!state.study || !state.hover) return;
    state.huWanted = true;
    if (!state.huBusy) nextHU();
  }
  async function nextHU() {
    state.huWanted = false;
    const p = state.hover, k = state.k, study = state.study;
    if (!p || !study) return;
    state.huBusy = true;
    try {
      const v = await json(await request(api(`/hu?k=${k}&x=${p.x}&y=${p.y}`)));
      if (state.study === study && state.hover) {
        const [lx, ly, lz] = v.lps_mm.map((c) => fmt(c, 1));
        $("hu-readout").textContent = `x ${v.x_px}, y ${v.y_px}, slice ${v.slice + 1}: ${Math.round(v.hu) || 0} HU` +
          ` · LPS (${lx}, ${ly}, ${lz}) mm`;
      }
    } catch (e) {
      if (state.study === study) $("hu-readout").textContent = `HU: ${e.message}`;
    } finally {
      await sleep(40);
      state.huBusy = false;
      if (state.huWanted) nextHU();
    }
  }
  $("slice-canvas").addEventListener("mouseleave", leaveSlice);

  // ------------------------------------------------------------------ clicks
  function toPixel(e) {
    const c = $("slice-canvas");
    const r = c.getBoundingClientRect();
    const [, ny, nx] = state.study.shape_zyx;
    return { x: ((e.clientX - r.left) / r.width) * nx - 0.5, y: ((e.clientY - r.top) / r.height) * ny - 0.5 };
  }
  $("slice-canvas").addEventListener("mousedown", (e) => {
    if (!state.study || e.button !== 0) return;
    if (state.running) {
      showError("still classifying the last lesion; click again when it is done");
      return;
    }
    const p = toPixel(e);
    state.drag = { k: state.k, x: p.x, y: p.y, rmm: 0 };
    draw();
  });
  $("slice-canvas").addEventListener("mousemove", (e) => {
    if (!state.study) return;
    const [, ny, nx] = state.study.shape_zyx;
    const h = toPixel(e);
    const x = Math.round(h.x), y = Math.round(h.y);
    const inside = x >= 0 && x < nx && y >= 0 && y < ny;
    if (!inside) leaveSlice();
    else if (!state.hover || state.hover.x !== x || state.hover.y !== y) { state.hover = { x, y }; askHU(); }
    if (!state.drag) return;
    const p = toPixel(e);
    const [, sy, sx] = state.study.spacing_zyx_mm;
    state.drag.rmm = Math.hypot((p.x - state.drag.x) * sx, (p.y - state.drag.y) * sy);
    if (state.drag.rmm >= 1) $("diameter").value = (2 * state.drag.rmm).toFixed(1);
    draw();
  });
  window.addEventListener("mouseup", () => {
    const d = state.drag;
    if (!d) return;
    state.drag = null;
    if (d.rmm < 1) d.rmm = Number($("diameter").value) / 2 || 0;
    state.marker = d;
    draw();
    classify({
      slice: d.k, x_px: d.x, y_px: d.y,
      diameter_mm: Number($("diameter").value) || null,
      use_mask: $("use-mask").checked,
    });
  });
  $("classify-label").addEventListener("click", () => classify({ label: Number($("mask-lesion").value) }));
  $("classify-all").addEventListener("click", () => classify({ all: true }));
  $("goto-lesion").addEventListener("click", () => {
    const l = (state.study.mask_lesions || []).find((x) => String(x.label) === $("mask-lesion").value);
    if (l) goTo(l.largest_slice);
  });

  // ------------------------------------------------------------------ classification jobs
  async function classify(body) {
    if (state.running) return;
    showError("");
    const t0 = performance.now();
    const study = state.study;
    state.running = true;
    setControls();
    busy("sending…");
    try {
      const job = await json(await request(api("/classify"), {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      }));
      let st = job;
      while (st.state === "queued" || st.state === "running") {
        busy(`${st.stage}… ${((performance.now() - t0) / 1000).toFixed(1)} s`);
        await sleep(200);
        st = await json(await request(`/api/jobs/${encodeURIComponent(job.job_id)}`));
      }
      if (st.state === "error") throw new Error(st.error);
      busy("");
      if (state.study !== study) return; // another CT was opened meanwhile: not its result
      for (const row of st.result.lesions) {
        row.min_size_mm = st.result.min_size_mm;
        state.results.set(row.lesion_id, row);
      }
      state.classNames = st.result.class_names || state.classNames;
      state.rule = st.result.decision_rule || state.rule;
      showRule();
      const last = st.result.lesions[st.result.lesions.length - 1];
      renderTable();
      setDownloads();
      if (last) select(last.lesion_id);
      loadSlice(); // the new lesion's outline
    } catch (e) {
      busy("");
      if (state.study !== study) return;
      showError(e.message);
      // a refused click (air, bad diameter, outside the volume) leaves no marker where nothing was classified
      if (body.slice !== undefined) { state.marker = null; draw(); }
    } finally {
      state.running = false;
      setControls();
    }
  }

  const columns = () => [
    ["lesion", (r) => r.lesion_id],
    ["class", (r) => r.pred_class],
    ...state.classNames.map((c) => [`P(${c})`, (r) => fmt(r[`prob_${c}`])]),
    ["ensemble SD", (r) => (r.n_models > 1 ? fmt(r.uncertainty) : "-")],
    ["entropy (bits)", (r) => fmt(r.entropy_bits)],
    ["diameter (mm)", (r) => fmt(r.max_axial_diameter_mm, 1)],
    ["volume (mL)", (r) => fmt(r.volume_ml, 2)],
    ["slice", (r) => fmt(r.slice + 1, 0)], // from 1, as the slice counter (centre_slice + 1)
    ["source", (r) => r.source],
  ];
  function renderTable() {
    const t = $("results-table");
    const cols = columns();
    t.tHead.innerHTML = "";
    t.tBodies[0].innerHTML = "";
    $("slice-numbering").hidden = !state.results.size;
    if (!state.results.size) return;
    const hr = t.tHead.insertRow();
    for (const [name] of cols) { const th = document.createElement("th"); th.textContent = name; hr.appendChild(th); }
    for (const row of state.results.values()) {
      const tr = t.tBodies[0].insertRow();
      tr.dataset.lesion = row.lesion_id;
      if (row.lesion_id === state.selected) tr.className = "selected";
      for (const [, get] of cols) tr.insertCell().textContent = get(row);
      tr.addEventListener("click", () => { select(row.lesion_id); goTo(row.slice); });
    }
  }
  function select(lid) {
    const r = state.results.get(lid);
    if (!r) return;
    state.selected = lid;
    renderTable();
    const p = state.classNames.map((c) => `P(${c}) ${fmt(r[`prob_${c}`], 2)}`).join(", ");
    const el = $("latest-result");
    el.innerHTML = "";
    const strong = document.createElement("strong");
    strong.id = "result-class";
    strong.textContent = r.pred_class;
    el.append(`${r.lesion_id}: `, strong);
    const classified = r.status === "classified";
    if (classified) {
      // "uncertainty" is the spread of an ensemble's members: one model has none (it read as "0.00": certain)
      const spread = r.n_models > 1 ? `ensemble SD ${fmt(r.uncertainty, 2)} (${r.n_models} models)`
        : "one model (no ensemble spread)";
      const most = fmt(Math.log2(Math.max(state.classNames.length, 2)), 2);
      el.append(` — ${p}; ${spread}; entropy ${fmt(r.entropy_bits, 2)} of at most ${most} bits.`);
    } else {
      const min = Number.isFinite(r.min_size_mm) ? `, under the ${fmt(r.min_size_mm, 0)} mm minimum` : "";
      el.append(` — smallest axis ${fmt(r.min_axis_mm, 1)} mm${min}: not classified.`);
    }
    const cam = $("gradcam").checked && classified; // no Grad-CAM for a lesion the model did not see
    const img = $("overlay");
    $("overlay-figure").hidden = false;
    $("overlay-caption").textContent = `${r.lesion_id}: ${sliceName(r.slice)}` + (cam ? ", with Grad-CAM" : "");
    busy(cam ? "drawing the overlay and Grad-CAM…" : "drawing the overlay…");
    img.onload = () => busy("");
    img.onerror = () => { busy(""); showError(`overlay of ${lid}: could not be drawn`); };
    img.src = r.overlay_url + (cam ? "?gradcam=1" : "");
  }
  $("gradcam").addEventListener("change", () => { if (state.selected) select(state.selected); });

  function showRule() {
    $("decision-rule").textContent = state.rule
      ? `Decision rule: ${state.rule}. Probabilities are the model's, for research: not a diagnosis.` : "";
  }

  function setDownloads() {
    const d = state.study.downloads || {};
    const reason = state.study.unavailable || {};
    const any = state.results.size > 0;
    const first = "classify a lesion first";
    $("downloads").hidden = false;
    const links = [
      ["dl-csv", "/results.csv", any && d.csv, first],
      ["dl-json", "/results.json", any && d.json, first],
      ["dl-sr", "/report-sr.dcm", any && d.sr, d.sr ? first : reason.sr || "needs a CT opened as DICOM"],
      ["dl-seg", "/seg.dcm", any && d.seg, d.seg ? first : reason.seg || "needs a CT opened as DICOM"],
    ];
    for (const [id, path, ok, why] of links) {
      const a = $(id);
      a.href = api(path);
      a.setAttribute("aria-disabled", ok ? "false" : "true");
      a.title = ok ? "" : why;
    }
  }
  // A download is fetched first, so a refusal (study closed after idling, server restarted or stopped,
  // SEG not possible) is said on the page; a plain link left a failed download and no word.
  for (const id of ["dl-csv", "dl-json", "dl-sr", "dl-seg"]) {
    $(id).addEventListener("click", async (e) => {
      e.preventDefault();
      const a = $(id);
      if (a.getAttribute("aria-disabled") === "true") { showError(a.title); return; } // says why
      const name = a.pathname.split("/").pop();
      showError("");
      busy(`preparing ${name}…`);
      try {
        const resp = await request(a.href);
        if (!resp.ok) await json(resp); // throws the server's one-line reason
        const url = URL.createObjectURL(await resp.blob());
        const save = document.createElement("a");
        save.href = url;
        save.download = name;
        document.body.appendChild(save);
        save.click();
        save.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
        busy("");
      } catch (err) {
        busy("");
        showError(`${name}: ${err.message}`);
      }
    });
  }
})();
