// medvae-retrieval web page: no build step, no dependencies. Talks to the /v1 API of the server that serves it.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  file: null,          // File of an uploaded / pasted query
  imageId: null,       // or a stored image id ("more like this")
  k: 24,
  payload: null,       // last search response
  info: null,
  spaces: [],          // GET /v1/spaces
  apiKey: sessionStorage.getItem("medvae-api-key") || "",
  positive: new Set(),  // relevance feedback: stored image ids marked relevant / not relevant
  negative: new Set(),
};
// the text box: a query of its own, or combined with the image (text_weight) in a space with a text tower
const queryText = () => $("#text-query").value.trim();
const hasQuery = () => Boolean(state.file || state.imageId || queryText());
const FILTER_FIELDS = ["modality", "body_part", "view", "laterality", "labels", "date_from", "date_to",
  "patient_sex", "age_from", "age_to"];

// ---------- HTTP ----------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.apiKey) headers.set("Authorization", `Bearer ${state.apiKey}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "network", `The server could not be reached (${err.message}).`);
  }
  if (response.status === 401) {
    $("#key-form").hidden = false;
    $("#api-key").focus();
    throw new ApiError(401, "unauthorized", "This server needs an API key: enter it above.");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let code = "http_error";
    try {
      const body = await response.json();
      if (body.error) { message = body.error.message; code = body.error.code; }
    } catch (_) { /* not JSON */ }
    if (response.status === 413) message = `The file is too large for this server. ${message}`;
    throw new ApiError(response.status, code, message);
  }
  return response;
}

async function loadImage(img, url) {
  // previews come through fetch so that an API key can go with them; until one arrives the box
  // shows a "decoding" placeholder (the server decodes a page's previews in one batch)
  img.classList.add("pending");
  img.title = "decoding the preview from the stored latent…";
  try {
    const blob = await (await api(url)).blob();
    img.src = URL.createObjectURL(blob);
    img.title = "";
  } catch (err) {
    img.alt = `preview unavailable: ${err.message}`;
    img.title = img.alt;
    img.classList.add("failed");
  } finally {
    img.classList.remove("pending");
  }
}

// ---------- status, errors ----------

function busy(on, text = "") {
  $("#progress").hidden = !on;
  $("#results").setAttribute("aria-busy", String(on));
  $("#search-button").disabled = on;
  $("#status").textContent = text;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
  if (message) box.scrollIntoView({ block: "nearest" });  // seen even when the user is down at the Search button
}

function clearResults() {
  // an error must never leave the previous query's results under the new query
  state.payload = null;
  $("#results").replaceChildren();
  $("#load-more").hidden = true;
  $("#export-csv").disabled = $("#export-json").disabled = true;
}

// ---------- info, banner, key ----------

async function loadInfo() {
  try {
    state.info = await (await api("/v1/info")).json();
  } catch (err) {
    showError(err.message);
    return;
  }
  const info = state.info;
  $("#model-info").textContent = `${info.model} · weights: ${info.weights} · pooling ${info.space.pooling}`;
  const banner = $("#random-banner");
  banner.hidden = !info.random_weights;
  // the server's own warning: random MedVAE weights or the fake test encoder, each said as it is
  banner.textContent = info.random_weights ? info.warning : "";
}

async function loadSpaces(wanted) {
  try {
    state.spaces = await (await api("/v1/spaces")).json();
  } catch (err) {
    showError(err.message);
    return;
  }
  const select = $("#space-select");
  select.replaceChildren();
  for (const space of state.spaces) {
    if (!space.images && !space.active) continue;
    const option = document.createElement("option");
    option.value = space.active ? "" : space.key;
    option.textContent = `${space.dims}-D · ${space.model} · ${poolingLabel(space.pooling)} · ${space.images} ${space.dims === 3 ? "volumes" : "images"}` +
      (space.active ? " (server default)" : "");
    option.selected = wanted ? space.key === wanted : space.active;
    select.append(option);
  }
}

// "spp:1,2,4+whiten:47f11673e2f3" -> "spp:1,2,4 · PCA-whitened (47f116…)": a transform fitted on this archive;
// "biomedclip[random-init:seed=0]" -> "BiomedCLIP semantic + text (RANDOM weights)"
function poolingLabel(pooling) {
  let [base, transform] = pooling.split("+");
  const clip = base.match(/^biomedclip\[(.*)\]$/);
  if (clip) base = `BiomedCLIP semantic + text (${clip[1].startsWith("random-init") ? "RANDOM weights" : clip[1].slice(0, 24)})`;
  if (!transform) return base;
  const [method, key] = transform.split(":");
  return `${base} · ${method === "whiten" ? "PCA-whitened" : "centred"} (${key.slice(0, 6)}…)`;
}

function selectedSpace() {
  const key = $("#space-select").value;
  return state.spaces.find((space) => (key ? space.key === key : space.active)) || null;
}

function spaceQuery() {
  const key = $("#space-select").value;
  return key ? `?space=${encodeURIComponent(key)}` : "";
}

$("#space-select").addEventListener("change", () => {
  // ids of one space mean nothing in another: a stored-image query starts over
  if (state.imageId) { state.imageId = null; $("#query-summary").textContent = "Space changed: choose a query."; }
  $("#results").replaceChildren();
  writeUrl();
});

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.apiKey = $("#api-key").value.trim();
  sessionStorage.setItem("medvae-api-key", state.apiKey);
  $("#key-form").hidden = true;
  showError("");
  await loadInfo();
  await loadSpaces($("#space-select").value);
  if (hasQuery()) runSearch();
});

// ---------- query input: drop, choose, paste ----------

function setFile(file) {
  if (!file) return;
  const limit = state.info ? state.info.max_request_bytes : Infinity;
  if (file.size > limit) {
    showError(`${file.name}: ${(file.size / 1e6).toFixed(1)} MB is too large (this server accepts up to ${(limit / 1e6).toFixed(1)} MB).`);
    return;
  }
  if (file.size === 0) {
    showError(`${file.name}: the file is empty.`);
    return;
  }
  state.file = file;
  state.imageId = null;
  state.k = pageSize();
  $("#file-input").value = "";  // choosing the same file again still fires "change"
  $("#query-summary").textContent = `Query: uploaded file ${file.name} (${(file.size / 1024).toFixed(0)} KB). Uploaded queries are not kept in the page address; click a result to get a shareable query.`;
  runSearch();
}

const dropZone = $("#drop-zone");
dropZone.addEventListener("dragover", (event) => { event.preventDefault(); dropZone.classList.add("over"); });
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("over");
  setFile(event.dataTransfer.files[0]);
});
$("#choose-file").addEventListener("click", () => $("#file-input").click());
$("#file-input").addEventListener("change", (event) => setFile(event.target.files[0]));
document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((entry) => entry.kind === "file");
  if (item) setFile(item.getAsFile());
});

// ---------- search ----------

function pageSize() { return Number($("#filters").elements.page_size.value) || 24; }

// On a phone the filters fold away under a summary that says how many are set.
function updateFilterSummary() {
  const count = Object.keys(currentFilters()).length + ($("#filters").elements.min_score.value ? 1 : 0) +
    ($("#filters").elements.exclude_same_patient.checked ? 1 : 0) + ($("#filters").elements.rerank.checked ? 1 : 0);
  $("#filter-summary").textContent = count ? `Filters (${count} set)` : "Filters";
}
$("#filters").addEventListener("input", updateFilterSummary);
if (window.matchMedia("(max-width: 700px)").matches) $("#filter-panel").open = false;

function currentFilters() {
  const form = $("#filters").elements;
  const filters = {};
  for (const name of FILTER_FIELDS) {
    const value = form[name].value.trim();
    if (value) filters[name] = value;
  }
  return filters;
}

function searchRequest() {
  const form = $("#filters").elements;
  const minScore = form.min_score.value.trim();
  const common = {
    k: state.k,
    filters: currentFilters(),
    exclude_same_patient: form.exclude_same_patient.checked,
    previews: "url",
  };
  if (form.rerank.checked) common.rerank = "latent";  // the top 100 re-scored with the whole stored latents
  if (state.imageId && !state.file) common.exclude_self = true;  // the query image itself is not a result
  if (state.positive.size) common.positive = [...state.positive];
  if (state.negative.size) common.negative = [...state.negative];
  if (form.space.value) common.space = form.space.value;
  if (minScore) common.min_score = Number(minScore);
  if (queryText()) {
    common.text = queryText();
    if (state.file || state.imageId) common.text_weight = Number(form.text_weight.value);
  }
  if (state.file) {
    const body = new FormData();
    body.append("file", state.file, state.file.name);
    for (const [key, value] of Object.entries(common)) {
      body.append(key, Array.isArray(value) ? value.join(",") : typeof value === "object" ? JSON.stringify(value) : String(value));
    }
    return { method: "POST", body };
  }
  return {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(state.imageId ? { ...common, image_id: state.imageId } : common),
  };
}

async function runSearch({ push = true } = {}) {
  if (!hasQuery()) return;
  showError("");
  busy(true, "Searching…");
  try {
    const payload = await (await api("/v1/search", searchRequest())).json();
    state.payload = payload;
    renderResults(payload);
    const studies = payload.results.length;
    busy(false, `${studies} stud${studies === 1 ? "y" : "ies"} in ${Math.round(payload.took_ms)} ms` +
      (payload.warnings.length ? ` — ${payload.warnings.join(" ")}` : ""));
    if (push) writeUrl();
  } catch (err) {
    busy(false, "");
    clearResults();
    showError(err.message);
  }
}

// Problems with what the form (or the URL) asks, before anything is sent; [] when none.
function formProblems() {
  const form = $("#filters").elements;
  const problems = [];
  const minScore = form.min_score.value.trim();
  if (minScore && !(Number(minScore) >= -1 && Number(minScore) <= 1)) problems.push(`min score ${minScore} is not a number from -1 to 1`);
  if (form.date_from.value && form.date_to.value && form.date_from.value > form.date_to.value) {
    problems.push(`date from (${form.date_from.value}) is after date to (${form.date_to.value})`);
  }
  const weight = form.text_weight.value;
  if (weight === "" || !(Number(weight) >= 0 && Number(weight) <= 1)) problems.push(`text weight ${weight} is not a number from 0 to 1`);
  const ageFrom = form.age_from.value, ageTo = form.age_to.value;
  if (ageFrom && ageTo && Number(ageFrom) > Number(ageTo)) problems.push(`age from (${ageFrom}) is above age to (${ageTo})`);
  return problems;
}

$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  state.k = pageSize();
  if (!hasQuery()) { showError("Choose a query image or describe what you look for first."); return; }
  if (!state.file && !state.imageId) $("#query-summary").textContent = `Query: text “${queryText()}”.`;
  const problems = formProblems();
  if (problems.length) { clearResults(); showError(`Not searched: ${problems.join("; ")}.`); return; }
  runSearch();
});

$("#load-more").addEventListener("click", () => {
  state.k += pageSize();
  runSearch();
});

// ---------- results ----------

function meta(image) {
  return [image.modality, image.body_part, image.view, image.laterality, image.study_date].filter(Boolean).join(" · ") || "no DICOM metadata";
}

function imageFigure(image, { score = true } = {}) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.alt = `Image ${image.image_id}: MedVAE reconstruction`;
  img.width = 192;
  img.height = 192;
  loadImage(img, image.preview_url || `/v1/images/${image.image_id}/preview.png`);
  const caption = document.createElement("figcaption");
  caption.innerHTML = "";
  const line = document.createElement("span");
  line.textContent = `#${image.image_id}` + (score && image.score !== undefined ? ` · score ${image.score.toFixed(3)}` : "");
  const metaLine = document.createElement("span");
  metaLine.className = "muted";
  metaLine.textContent = meta(image);
  const recon = document.createElement("span");
  recon.className = "tag";
  recon.textContent = "MedVAE reconstruction";
  caption.append(line, metaLine, recon);
  if (image.recon_psnr !== null && image.recon_psnr !== undefined) {
    const quality = document.createElement("span");
    quality.className = "muted quality";
    quality.textContent = `reconstruction PSNR ${image.recon_psnr.toFixed(1)} dB · SSIM ${image.recon_ssim.toFixed(3)}`;
    caption.append(quality);
  }
  if (image.labels && image.labels.length) {
    const labels = document.createElement("span");
    labels.className = "labels";
    labels.textContent = image.labels.join(", ");
    caption.append(labels);
  }
  figure.append(img, caption);
  return figure;
}

function button(text, onClick, label) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  if (label) element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

// A long UID on one line, cut with an ellipsis; the whole UID in its tooltip (and copied whole).
function uidSpan(uid) {
  const span = document.createElement("span");
  span.className = "uid";
  span.textContent = uid;
  span.title = uid;
  return span;
}

// The folders above a file, for telling apart studies whose labels are the same ("study_02" twice).
function pathTail(source) {
  const parts = String(source || "").split("/").filter(Boolean);
  return parts.slice(-3, -1).join("/") || source;
}

function renderResults(payload) {
  const list = $("#results");
  list.replaceChildren();
  const labelCount = {};
  for (const result of payload.results) labelCount[result.study.label] = (labelCount[result.study.label] || 0) + 1;
  payload.results.forEach((result, rank) => {
    const best = result.images[0];
    const item = document.createElement("li");
    item.className = "card";
    const title = document.createElement("h3");
    const label = labelCount[result.study.label] > 1 ? `${result.study.label} (${pathTail(best.source)})` : result.study.label;
    title.textContent = `${rank + 1}. ${label}`;
    title.title = `${label} — ${best.source}`;
    const score = document.createElement("p");
    score.className = "score";
    score.textContent = `score ${result.score.toFixed(3)}`;
    const actions = document.createElement("div");
    actions.className = "card-actions";
    actions.append(
      button("More like this", () => moreLikeThis(best.image_id), `More like this: image ${best.image_id}`),
      button("Study", () => openStudy(result.study.study_id), `Study: ${result.study.label}`),
    );
    if (selectedSpace()?.dims !== 3) {  // the cell-by-cell heat map is drawn for 2-D latents
      actions.insertBefore(button("Compare", () => openCompare(best.image_id), `Compare: query with image ${best.image_id}`), actions.children[1]);
    }
    actions.append(feedbackButton(best.image_id, true), feedbackButton(best.image_id, false));
    item.append(title, score, imageFigure(best), actions);
    if (result.images.length > 1) {
      const more = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = `${result.images.length - 1} more matching image${result.images.length > 2 ? "s" : ""} in this study`;
      more.append(summary);
      more.addEventListener("toggle", () => {
        if (more.open && more.children.length === 1) {
          for (const image of result.images.slice(1)) {
            const wrap = document.createElement("div");
            wrap.append(imageFigure(image), button("More like this", () => moreLikeThis(image.image_id), `More like this: image ${image.image_id}`));
            more.append(wrap);
          }
        }
      });
      item.append(more);
    }
    list.append(item);
  });
  $("#load-more").hidden = payload.results.length < state.k;
  $("#export-csv").disabled = $("#export-json").disabled = payload.results.length === 0;
}

// ---------- relevance feedback ----------

// A toggle on a result: relevant (more like this one) or not relevant (less like it); one mark per image.
function feedbackButton(imageId, relevant) {
  const marks = relevant ? state.positive : state.negative;
  const element = button(relevant ? "👍 Relevant" : "👎 Not relevant", () => {
    const other = relevant ? state.negative : state.positive;
    if (marks.has(imageId)) marks.delete(imageId); else { marks.add(imageId); other.delete(imageId); }
    renderFeedback();
  }, `${relevant ? "Relevant" : "Not relevant"}: image ${imageId}`);
  element.dataset.feedbackId = String(imageId);
  element.dataset.relevant = relevant ? "1" : "0";
  element.classList.add(relevant ? "mark-positive" : "mark-negative");
  element.setAttribute("aria-pressed", String(marks.has(imageId)));
  return element;
}

function renderFeedback() {
  for (const toggle of document.querySelectorAll("[data-feedback-id]")) {
    const marks = toggle.dataset.relevant === "1" ? state.positive : state.negative;
    toggle.setAttribute("aria-pressed", String(marks.has(Number(toggle.dataset.feedbackId))));
  }
  const bar = $("#feedback");
  const ids = (marks) => [...marks].map((id) => `#${id}`).join(", ") || "none";
  bar.hidden = !state.positive.size && !state.negative.size;
  $("#feedback-list").textContent = `More like: ${ids(state.positive)} · less like: ${ids(state.negative)}`;
}

function clearFeedback() {
  state.positive.clear();
  state.negative.clear();
  renderFeedback();
}

$("#refine").addEventListener("click", () => runSearch());
$("#clear-feedback").addEventListener("click", () => { clearFeedback(); runSearch(); });

function moreLikeThis(imageId) {
  closeOverlays();
  clearFeedback();
  state.file = null;
  state.imageId = imageId;
  state.k = pageSize();
  $("#text-query").value = "";  // "more like this" is the image alone
  $("#query-summary").textContent = `Query: stored image #${imageId}.`;
  runSearch();
}

// ---------- URL state ----------

function writeUrl() {
  const params = new URLSearchParams();
  if (state.imageId) params.set("image_id", state.imageId);
  if ($("#space-select").value) params.set("space", $("#space-select").value);
  for (const [key, value] of Object.entries(currentFilters())) params.set(key, value);
  const form = $("#filters").elements;
  if (form.min_score.value) params.set("min_score", form.min_score.value);
  if (form.exclude_same_patient.checked) params.set("exclude_same_patient", "1");
  if (form.rerank.checked) params.set("rerank", "latent");
  if (state.positive.size) params.set("positive", [...state.positive].join(","));
  if (state.negative.size) params.set("negative", [...state.negative].join(","));
  if (queryText()) params.set("text", queryText());
  if (queryText() && form.text_weight.value !== "0.5") params.set("text_weight", form.text_weight.value);
  params.set("k", state.k);
  const url = `${location.pathname}?${params}${location.hash}`;
  if (url !== `${location.pathname}${location.search}${location.hash}`) history.pushState(null, "", url);
}

const URL_PARAMS = new Set(["space", "image_id", "text", "text_weight", "k", "min_score", "exclude_same_patient", "rerank", "positive", "negative", ...FILTER_FIELDS]);

// What is wrong with a shared link's parameters (a typo must never be ignored silently); [] when none.
function urlProblems(params) {
  const problems = [];
  for (const key of params.keys()) if (!URL_PARAMS.has(key)) problems.push(`unknown parameter "${key}"`);
  const whole = (name) => params.has(name) && !/^[1-9][0-9]*$/.test(params.get(name));
  if (whole("k")) problems.push(`k=${params.get("k")} is not a positive whole number`);
  if (params.has("rerank") && params.get("rerank") !== "latent") problems.push(`rerank=${params.get("rerank")} is not "latent"`);
  if (whole("image_id")) problems.push(`image_id=${params.get("image_id")} is not a positive whole number`);
  for (const name of ["positive", "negative"]) {
    if (params.has(name) && !/^[1-9][0-9]*(,[1-9][0-9]*)*$/.test(params.get(name))) problems.push(`${name}=${params.get(name)} is not a list of image ids`);
  }
  const minScore = params.get("min_score");  // a number input drops what is not a number: check the link itself
  if (minScore !== null && !(Number(minScore) >= -1 && Number(minScore) <= 1)) problems.push(`min score ${minScore} is not a number from -1 to 1`);
  for (const name of ["age_from", "age_to"]) {
    if (params.has(name) && !(Number(params.get(name)) >= 0)) problems.push(`${name}=${params.get(name)} is not a number of years`);
  }
  for (const name of ["date_from", "date_to"]) {
    if (params.has(name) && !/^\d{4}-\d{2}-\d{2}$/.test(params.get(name))) problems.push(`${name}=${params.get(name)} is not a date (YYYY-MM-DD)`);
  }
  const space = params.get("space");
  if (space && ![...$("#space-select").options].some((option) => option.value === space)) problems.push(`space ${space} is not on this server`);
  return problems;
}

function readUrl() {
  const params = new URLSearchParams(location.search);
  const form = $("#filters").elements;
  const space = params.get("space") || "";
  if ([...form.space.options].some((option) => option.value === space)) form.space.value = space;
  for (const name of FILTER_FIELDS) form[name].value = params.get(name) || "";
  form.min_score.value = params.get("min_score") || "";
  form.exclude_same_patient.checked = params.get("exclude_same_patient") === "1";
  form.rerank.checked = params.get("rerank") === "latent";
  form.text.value = params.get("text") || "";
  form.text_weight.value = params.get("text_weight") || "0.5";
  state.k = Number(params.get("k")) || pageSize();
  if ([...form.page_size.options].some((option) => Number(option.value) === state.k)) form.page_size.value = String(state.k);
  updateFilterSummary();
  const problems = [...urlProblems(params), ...formProblems()];
  if (problems.length) {  // say what is wrong with the link instead of searching without it
    clearResults();
    showError(`This link asks for something that cannot be searched: ${problems.join("; ")}.`);
    return;
  }
  state.positive = new Set((params.get("positive") || "").split(",").filter(Boolean).map(Number));
  state.negative = new Set((params.get("negative") || "").split(",").filter(Boolean).map(Number));
  renderFeedback();
  const imageId = Number(params.get("image_id"));
  if (imageId > 0) {
    state.file = null;
    state.imageId = imageId;
    $("#query-summary").textContent = `Query: stored image #${imageId}` + (queryText() ? ` and text “${queryText()}”.` : ".");
    runSearch({ push: false });
  } else if (queryText()) {
    state.file = null;
    state.imageId = null;
    $("#query-summary").textContent = `Query: text “${queryText()}”.`;
    runSearch({ push: false });
  }
}
window.addEventListener("popstate", readUrl);

// ---------- study view ----------

async function openStudy(studyId) {
  const view = $("#study-view");
  $("#study-images").replaceChildren();
  $("#study-title").textContent = "Study…";
  openOverlay(view);
  try {
    const body = await (await api(`/v1/studies/${studyId}`)).json();
    $("#study-title").textContent = `Study ${body.study.label}`;
    const details = [body.study.study_date, `${body.images.length} image(s)`, `weights: ${body.weights}`].filter(Boolean).join(" · ");
    $("#study-meta").replaceChildren(details);
    if (body.study.study_uid) $("#study-meta").append(" · StudyInstanceUID ", uidSpan(body.study.study_uid));
    for (const image of body.images) {
      const item = document.createElement("li");
      item.className = "card";
      image.preview_url = `/v1/images/${image.image_id}/preview.png${spaceQuery()}`;
      item.append(imageFigure(image, { score: false }), button("More like this", () => moreLikeThis(image.image_id), `More like this: image ${image.image_id}`));
      $("#study-images").append(item);
    }
  } catch (err) {
    $("#study-meta").textContent = err.message;
  }
}

// ---------- compare view ----------

function heatColour(value, low, high) {
  // cosine scaled to this map's own range (low..high) -> blue (least similar) .. green .. red (most similar)
  const t = high > low ? Math.max(0, Math.min(1, (value - low) / (high - low))) : 1;
  const r = Math.round(255 * Math.min(1, 2 * t));
  const g = Math.round(255 * (1 - Math.abs(2 * t - 1)));
  const b = Math.round(255 * Math.min(1, 2 * (1 - t)));
  return [r, g, b];
}

function drawCompare(targetImage, grid, withHeat) {
  const canvas = $("#compare-canvas");
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = true;
  context.globalAlpha = 1;
  context.drawImage(targetImage, 0, 0, canvas.width, canvas.height);
  if (!withHeat) return;
  const cells = document.createElement("canvas");
  cells.width = grid.cols;
  cells.height = grid.rows;
  const cellContext = cells.getContext("2d");
  const pixels = cellContext.createImageData(grid.cols, grid.rows);
  const values = grid.cells.flat();
  const low = Math.min(...values);
  const high = Math.max(...values);
  $("#legend-low").textContent = `least similar cell (${low.toFixed(3)})`;
  $("#legend-high").textContent = `most similar cell (${high.toFixed(3)}); cosine of latent cells`;
  grid.cells.forEach((row, y) => row.forEach((value, x) => {
    const [r, g, b] = heatColour(value, low, high);
    pixels.data.set([r, g, b, 255], 4 * (y * grid.cols + x));
  }));
  cellContext.putImageData(pixels, 0, 0);
  context.globalAlpha = 0.45;
  context.drawImage(cells, 0, 0, canvas.width, canvas.height); // bilinear upsampling of the latent grid
  context.globalAlpha = 1;
}

async function openCompare(targetId) {
  const view = $("#compare-view");
  openOverlay(view);
  $("#compare-meta").textContent = "Computing the similarity map…";
  let request;
  if (state.file) {
    const body = new FormData();
    body.append("file", state.file, state.file.name);
    body.append("target_image_id", String(targetId));
    request = { method: "POST", body };
  } else {
    request = { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image_id: state.imageId, target_image_id: targetId }) };
  }
  try {
    const result = await (await api("/v1/similarity-map", request)).json();
    $("#compare-query").src = `data:image/png;base64,${result.query_preview_png_base64}`;
    const target = new Image();
    const blob = await (await api(result.target_preview_url)).blob();
    target.src = URL.createObjectURL(blob);
    await target.decode();
    const toggle = $("#heat-toggle");
    drawCompare(target, result.grid, toggle.checked);
    toggle.onchange = () => drawCompare(target, result.grid, toggle.checked);
    $("#compare-meta").textContent = `Image #${targetId} · score ${result.score.toFixed(3)} · ${result.grid.rows}×${result.grid.cols} latent cells · weights: ${result.weights}. ${result.note}`;
    view.dataset.ready = "1";
  } catch (err) {
    $("#compare-meta").textContent = err.message;
  }
}

// Dialogs: focus moves in on open, stays inside while open (Tab wraps), and returns on close.
let focusBeforeOverlay = null;

function openOverlay(view) {
  if (view.hidden) focusBeforeOverlay = document.activeElement;
  view.hidden = false;
  view.querySelector("[data-close]").focus();
}

function openOverlayElement() { return [...document.querySelectorAll(".overlay")].find((overlay) => !overlay.hidden); }

function closeOverlays() {
  const wasOpen = Boolean(openOverlayElement());
  for (const overlay of document.querySelectorAll(".overlay")) {
    overlay.hidden = true;
    delete overlay.dataset.ready;
  }
  if (wasOpen && focusBeforeOverlay && document.contains(focusBeforeOverlay)) focusBeforeOverlay.focus();
  focusBeforeOverlay = null;
}

function keepFocusInside(event) {
  const open = openOverlayElement();
  if (!open || event.key !== "Tab") return;
  const focusable = [...open.querySelectorAll("button, [href], input, select, textarea, [tabindex]:not([tabindex='-1'])")]
    .filter((element) => !element.disabled && element.offsetParent !== null);
  if (!focusable.length) return;
  const first = focusable[0], last = focusable[focusable.length - 1];
  if (!open.contains(document.activeElement)) { event.preventDefault(); first.focus(); }
  else if (event.shiftKey && document.activeElement === first) { event.preventDefault(); last.focus(); }
  else if (!event.shiftKey && document.activeElement === last) { event.preventDefault(); first.focus(); }
}
document.addEventListener("click", (event) => { if (event.target.matches("[data-close]")) closeOverlays(); });
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeOverlays();
  keepFocusInside(event);
});

// ---------- export ----------

// One row per result image: every field of the API's image JSON (so a field added there, such as
// the DICOM UIDs, sex and age, is exported too), its study, and the weights that made the vectors.
const NOT_EXPORTED = new Set(["preview_url", "preview_png_base64"]);

function exportRows(payload) {
  const rows = [];
  payload.results.forEach((result, rank) => {
    for (const image of result.images) {
      const row = {
        rank: rank + 1, study_id: result.study.study_id, study_label: result.study.label,
        study_uid: result.study.study_uid || "", study_score: result.score,
      };
      for (const [key, value] of Object.entries(image)) {
        if (NOT_EXPORTED.has(key)) continue;
        row[key === "score" ? "image_score" : key] = Array.isArray(value) ? value.join("|") : (value ?? "");
      }
      row.weights = payload.model.weights;
      rows.push(row);
    }
  });
  return rows;
}

function csvCell(value) {
  const text = String(value ?? "");
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function download(name, type, text) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
}

$("#export-csv").addEventListener("click", () => {
  const rows = exportRows(state.payload);
  const columns = Object.keys(rows[0]);
  const text = [columns.join(","), ...rows.map((row) => columns.map((c) => csvCell(row[c])).join(","))].join("\n") + "\n";
  download("similar-cases.csv", "text/csv", text);
});

$("#export-json").addEventListener("click", () => {
  const { model, space, query, group_by, results } = state.payload;
  download("similar-cases.json", "application/json", JSON.stringify({ model, space, query, group_by, results }, null, 2));
});

// ---------- start ----------

loadInfo().then(() => loadSpaces(new URLSearchParams(location.search).get("space"))).then(readUrl);
