// coca search web gallery: plain JS over the gallery's JSON API (see clients/web/server.py).
"use strict";

const $ = (id) => document.getElementById(id);
let uploaded = null; // the chosen File

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = {};
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.code = body.code || String(response.status);
    throw error;
  }
  return body;
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function loadStats() {
  try {
    const s = await api("/api/stats");
    const ready = s.triton_ready ? "" : " · model server not ready";
    $("stats").textContent =
      `${s.count} images · ${s.model || "no model yet"}${s.pretrained ? " (" + s.pretrained + ")" : ""} · index ${s.index}${ready}`;
    $("banner").hidden = !s.random_weights;
  } catch (e) {
    $("stats").textContent = `search service: ${e.message}`;
  }
}

function options() {
  return `k=${encodeURIComponent($("k").value)}&captions=${$("captions").checked ? 1 : 0}`;
}

function render(result) {
  const grid = $("results");
  grid.replaceChildren();
  const template = $("card-template");
  result.hits.forEach((hit, i) => {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.id = hit.id;
    const img = card.querySelector(".thumb");
    img.src = hit.thumb;
    img.alt = hit.name;
    img.title = hit.uri || hit.id;
    card.querySelector(".rank").textContent = `#${i + 1}`;
    card.querySelector(".score").textContent = hit.score.toFixed(3);
    const caption = card.querySelector(".caption");
    caption.title = hit.caption || hit.caption_error || "";
    if (hit.caption) caption.textContent = hit.caption;
    else if (hit.caption_error) { caption.textContent = hit.caption_error; caption.classList.add("error"); }
    card.querySelector(".name").textContent = hit.name;
    card.querySelector(".caption-hit").addEventListener("click", (e) => captionHit(card, hit.id, e.target));
    card.querySelector(".similar").addEventListener("click", () => similar(hit.id, hit.name));
    grid.appendChild(card);
  });
  setStatus(`${result.hits.length} of ${result.searched} images for “${result.query}” · ${result.ms} ms`);
}

async function run(what, call) {
  setStatus(`${what}…`);
  try {
    render(await call());
  } catch (e) {
    setStatus(`${what} failed: ${e.message}`, true);
  }
}

async function searchText(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) { setStatus("Type something to search for.", true); return; }
  // POST: a search with captions stores them (the gallery refuses that as GET)
  await run(`searching “${q}”`, () => api(`/api/search?q=${encodeURIComponent(q)}&${options()}`, { method: "POST" }));
}

async function similar(id, name) {
  await run(`images like ${name}`, () => api(`/api/similar?id=${encodeURIComponent(id)}&${options()}`, { method: "POST" }));
}

async function searchImage() {
  if (!uploaded) return;
  await run(`images like ${uploaded.name}`, () =>
    api(`/api/search-image?${options()}`, { method: "POST", body: uploaded,
                                            headers: { "Content-Type": uploaded.type || "application/octet-stream" } }));
}

async function captionUpload() {
  if (!uploaded) return;
  const out = $("upload-caption");
  out.hidden = false;
  out.classList.remove("error");
  out.textContent = "captioning…";
  try {
    const r = await api("/api/caption", { method: "POST", body: uploaded,
                                          headers: { "Content-Type": uploaded.type || "application/octet-stream" } });
    out.textContent = r.caption;
  } catch (e) {
    out.textContent = `caption failed: ${e.message}`;
    out.classList.add("error");
  }
}

async function captionHit(card, id, button) {
  const caption = card.querySelector(".caption");
  button.disabled = true;
  caption.classList.remove("error");
  caption.textContent = "captioning…";
  try {
    caption.textContent = caption.title =
      (await api(`/api/caption?id=${encodeURIComponent(id)}`, { method: "POST" })).caption;
  } catch (e) {
    caption.textContent = e.message;
    caption.classList.add("error");
  } finally {
    button.disabled = false;
  }
}

function chooseFile() {
  uploaded = $("upload").files[0] || null;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !uploaded;
  if (uploaded) preview.src = URL.createObjectURL(uploaded);
  document.querySelector(".file span").textContent = uploaded ? uploaded.name : "Choose an image…";
  $("image-search-button").disabled = $("caption-button").disabled = !uploaded;
  $("upload-caption").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", searchText);
  $("upload").addEventListener("change", chooseFile);
  $("image-search-button").addEventListener("click", searchImage);
  $("caption-button").addEventListener("click", captionUpload);
  loadStats();
});
