// The search page: pick or drop a photo, optionally drag a box on it, search, show the products.
"use strict";

const $ = (id) => document.getElementById(id);
const drop = $("drop"), file = $("file"), stage = $("stage"), photo = $("photo"), boxEl = $("box");
const form = $("controls"), searchButton = $("search"), clearBox = $("clear-box");
const errorEl = $("error"), statusEl = $("status"), results = $("results"), boxText = $("box-text");

let current = null;   // the chosen File
let box = null;       // [left, top, width, height] in pixels of the photo
let dragStart = null; // where a drag began, in displayed pixels

function showError(message) {
  errorEl.textContent = message;
  errorEl.hidden = !message;
}

function choose(f) {
  if (!f) return;
  current = f;
  box = null;
  boxEl.hidden = true;
  boxText.textContent = "";
  showError("");
  photo.src = URL.createObjectURL(f);
  stage.hidden = false;
  $("drop-hint").hidden = true;
  searchButton.disabled = false;
  clearBox.disabled = true;
}

file.addEventListener("change", () => choose(file.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]);
});

// Drag a box on the photo. Displayed pixels are converted to the photo's own pixels for the API.
function point(e) {
  const r = photo.getBoundingClientRect();
  return [Math.min(Math.max(e.clientX - r.left, 0), r.width), Math.min(Math.max(e.clientY - r.top, 0), r.height)];
}
stage.addEventListener("mousedown", (e) => { dragStart = point(e); e.preventDefault(); });
window.addEventListener("mousemove", (e) => {
  if (!dragStart) return;
  const [x, y] = point(e);
  const left = Math.min(x, dragStart[0]), top = Math.min(y, dragStart[1]);
  Object.assign(boxEl.style, { left: left + "px", top: top + "px", width: Math.abs(x - dragStart[0]) + "px", height: Math.abs(y - dragStart[1]) + "px" });
  boxEl.hidden = false;
});
window.addEventListener("mouseup", (e) => {
  if (!dragStart) return;
  const [x, y] = point(e);
  const r = photo.getBoundingClientRect();
  const sx = photo.naturalWidth / r.width, sy = photo.naturalHeight / r.height;
  const w = Math.abs(x - dragStart[0]), h = Math.abs(y - dragStart[1]);
  if (w >= 4 && h >= 4) {
    // Whole pixels of the photo, rounded outwards and kept inside it (the service refuses a box that reaches outside).
    const left = Math.floor(Math.min(x, dragStart[0]) * sx), top = Math.floor(Math.min(y, dragStart[1]) * sy);
    const right = Math.min(photo.naturalWidth, Math.ceil(Math.max(x, dragStart[0]) * sx));
    const bottom = Math.min(photo.naturalHeight, Math.ceil(Math.max(y, dragStart[1]) * sy));
    box = [left, top, right - left, bottom - top];
    boxText.textContent = `Box: left ${box[0]}, top ${box[1]}, ${box[2]} x ${box[3]} pixels.`;
    clearBox.disabled = false;
  } else {
    boxEl.hidden = true;
  }
  dragStart = null;
});
clearBox.addEventListener("click", () => { box = null; boxEl.hidden = true; boxText.textContent = ""; clearBox.disabled = true; });

function card(hit) {
  const div = document.createElement("div");
  div.className = "card";
  // The product's catalogue photo, also when the photo matched one of its customer photos (not served); none: a placeholder.
  let img;
  if (hit.image_url) {
    img = document.createElement("img");
    img.src = hit.image_url;
    img.alt = hit.product_id;
    img.loading = "lazy";
  } else {
    img = document.createElement("div");
    img.className = "no-photo";
    img.textContent = "no catalogue photo";
  }
  const name = hit.labels.product_name || hit.labels.name || hit.product_id;
  const rank = document.createElement("div");
  rank.innerHTML = `<span class="rank">${hit.rank}.</span> <span class="label"></span>`;
  rank.querySelector(".label").textContent = name;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = `${hit.product_id}${hit.category ? " · " + hit.category : ""} · similarity ${hit.similarity.toFixed(3)}`;
  div.append(img, rank, meta);
  if (hit.matched && hit.matched.domain === "street") {
    const mark = document.createElement("div");
    mark.className = "matched-customer";
    mark.textContent = "matched a customer photo";
    mark.title = "The photo looked most like one of this product's customer photos, indexed beside the catalogue.";
    div.append(mark);
  }
  return div;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!current) return;
  showError("");
  statusEl.textContent = "Searching…";
  searchButton.disabled = true;
  const body = new FormData();
  body.append("image", current);
  body.append("k", $("k").value);
  if (box) body.append("box", box.join(","));
  if ($("category").value.trim()) body.append("category", $("category").value.trim());
  try {
    const response = await fetch("/v1/search", { method: "POST", body });
    let answer = null;
    try { answer = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      const detail = answer && answer.detail ? (typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail)) : response.statusText;
      throw new Error(`${response.status}: ${detail}`);
    }
    results.replaceChildren(...answer.results.map(card));
    const t = answer.timings;
    statusEl.textContent = `${answer.results.length} products · index version ${answer.index_version} · model version ${answer.model_version} (${answer.model_fingerprint}) · embed ${t.embed_ms} ms, search ${t.search_ms} ms, total ${t.total_ms} ms`;
    if (!answer.results.length) showError("No product found: the index being served is empty.");
  } catch (err) {
    results.replaceChildren();
    statusEl.textContent = "";
    showError(`The search failed: ${err.message}`);
  } finally {
    searchButton.disabled = false;
  }
});
