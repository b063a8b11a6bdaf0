// coca search web gallery: plain JS over the gallery's JSON API (see clients/web/server.py).
"use strict";

const $ = (id) => document.getElementById(id);
let uploaded = null; // the chosen File
const conditions = []; // the condition form's conditions, as `coca search --where` writes them
// What the pager pages: a request (its URL without page_token, whether it must be POST, how to show it) and
// the page tokens seen so far (tokens[i]: the token of page i; "" for the first).
let paging = null;

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

// k (the page size), captions, mode; the conditions and the order when `withConditions`.
function options({ withMode = false, withConditions = true, size = "k" } = {}) {
  const params = new URLSearchParams({ [size]: $("k").value, captions: $("captions").checked ? 1 : 0 });
  if (withMode) params.set("mode", $("mode").value);
  if (withConditions) {
    conditions.forEach((c) => params.append("where", c));
    if ($("order").value) params.set("order_by", $("order").value);
  }
  return params;
}

function card(item, rank) {
  const node = $("card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = item.id;
  const img = node.querySelector(".thumb");
  img.src = item.thumb;
  img.alt = item.name;
  img.title = item.uri || item.id;
  node.querySelector(".rank").textContent = `#${rank}`;
  const score = node.querySelector(".score");
  if (item.score !== undefined) score.textContent = item.score.toFixed(3);
  else { score.textContent = new Date(item.added_at * 1000).toISOString().slice(0, 10); score.title = "added"; }
  const lists = [];  // keyword/hybrid search: which lists found the hit, at which rank
  if (item.vector_rank) lists.push(`vector #${item.vector_rank}`);
  if (item.keyword_rank) lists.push(`keyword #${item.keyword_rank}`);
  node.querySelector(".lists").textContent = lists.join(" · ");
  const caption = node.querySelector(".caption");
  caption.title = item.caption || item.caption_error || "";
  if (item.caption) caption.textContent = item.caption;
  else if (item.caption_error) { caption.textContent = item.caption_error; caption.classList.add("error"); }
  node.querySelector(".name").textContent = item.name;
  if (item.scene) showMoment(node, item);
  node.querySelector(".caption-hit").addEventListener("click", (e) => captionHit(node, item.id, e.target));
  node.querySelector(".similar").addEventListener("click", () => similar(item.id, item.name));
  return node;
}

// 83.4 -> "1:23.4"
const clock = (s) => `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`;

// A video scene's card: its player (from the gallery's /video/ID by range requests, playing the scene's
// start to its end: a media fragment), its times, and a button for its video's scene strip.
function showMoment(node, item) {
  const player = document.createElement("video");
  player.className = "thumb";
  player.controls = true;
  player.preload = "metadata";
  player.poster = item.thumb;
  player.src = item.scene.src;
  node.querySelector(".thumb").replaceWith(player);
  const moment = node.querySelector(".moment");
  moment.textContent = `${clock(item.scene.start_s)}–${clock(item.scene.end_s)}`;
  moment.hidden = false;
  const scenes = node.querySelector(".scenes");
  scenes.hidden = false;
  scenes.addEventListener("click", () => showStrip(item.scene.video_id, item.scene.start_s));
}

// The scene strip of a video: its scenes' keyframes with their times; a keyframe plays the video from there.
async function showStrip(videoId, startS) {
  try {
    const video = await api(`/api/video?id=${encodeURIComponent(videoId)}`);
    const player = $("strip-player");
    player.src = `/video/${encodeURIComponent(video.id)}#t=${startS}`;
    $("strip-title").textContent = `${video.name} · ${video.scenes.length} scenes · ${clock(video.duration_s)}`;
    $("strip-scenes").replaceChildren(...video.scenes.map((scene) => {
      const li = document.createElement("li");
      li.dataset.start = scene.start_s;
      const img = document.createElement("img");
      img.src = scene.thumb;
      img.alt = img.title = scene.caption || scene.id;
      const time = document.createElement("span");
      time.textContent = `${clock(scene.start_s)}–${clock(scene.end_s)}`;
      li.append(img, time);
      li.addEventListener("click", () => { player.currentTime = scene.start_s; player.play(); });
      return li;
    }));
    $("scene-strip").hidden = false;
  } catch (e) {
    setStatus(`scenes of ${videoId}: ${e.message}`, true);
  }
}

function renderCards(items, offset) {
  $("results").replaceChildren(...items.map((item, i) => card(item, offset + i + 1)));
}

function renderGroups(result) {
  $("results").replaceChildren(...result.groups.map((group, i) => {
    const node = $("group-template").content.firstElementChild.cloneNode(true);
    const best = group.pairs.length ? group.pairs[0].score.toFixed(3) : "";
    node.querySelector(".group-title").textContent = `group ${paging.offset + i + 1} · ${group.size} images · best pair ${best}`;
    node.querySelector(".pairs").textContent =
      group.pairs.map((p) => `${p.a.slice(0, 8)}–${p.b.slice(0, 8)} ${p.score.toFixed(3)}`).join(" · ");
    node.querySelector(".group-cards").replaceChildren(...group.items.map((item, j) => card(item, j + 1)));
    return node;
  }));
  $("results").classList.remove("grid");
}

// One page of what `paging` pages (its page `paging.page`), shown.
async function showPage() {
  const { request, tokens, page } = paging;
  const url = `${request.path}&page_token=${encodeURIComponent(tokens[page])}`;
  setStatus(`${request.what}…`);
  try {
    const result = await api(url, request.post ? { method: "POST" } : {});
    if (paging.request !== request) return; // another search started meanwhile
    const rows = result.hits || result.items || result.groups;
    paging.offset = page * Number(request.size);
    $("results").classList.add("grid");
    if (result.groups) renderGroups(result); else renderCards(rows, paging.offset);
    tokens.length = page + 1;
    if (result.next_page_token) tokens.push(result.next_page_token);
    $("pager").hidden = page === 0 && !result.next_page_token;
    $("previous-page").disabled = page === 0;
    $("next-page").disabled = !result.next_page_token;
    $("page-info").textContent = `page ${page + 1}`;
    setStatus(request.describe(result, rows) + ` · page ${page + 1} · ${result.ms} ms`);
  } catch (e) {
    setStatus(`${request.what} failed: ${e.message}`, true);
  }
}

function start(request) {
  paging = { request, tokens: [""], page: 0, offset: 0 };
  return showPage();
}

function turn(step) {
  if (!paging) return;
  paging.page = Math.max(0, Math.min(paging.tokens.length - 1, paging.page + step));
  showPage();
}

const hitsLine = (query) => (result, rows) => `${rows.length} of ${result.searched} images for “${query}”`;

async function searchText(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) { setStatus("Type something to search for.", true); return; }
  const params = options({ withMode: true });
  params.set("q", q);
  // POST: a search with captions stores them (the gallery refuses that as GET)
  await start({ path: `/api/search?${params}`, post: true, size: $("k").value, what: `searching “${q}”`,
                describe: hitsLine(q) });
}

async function browse() {
  await start({ path: `/api/list?${options({ size: "page_size" })}`, size: $("k").value, what: "browsing",
                describe: (result, rows) => `${rows.length} of ${result.total} images` });
}

async function duplicates() {
  const params = options({ withConditions: false, size: "page_size" });
  params.set("threshold", $("threshold").value);
  await start({ path: `/api/duplicates?${params}`, size: $("k").value, what: "finding near-duplicates",
                describe: (result, rows) => `${rows.length} of ${result.total_groups} groups of near-duplicates at ≥ ${result.threshold}` });
}

async function similar(id, name) {
  await start({ path: `/api/similar?id=${encodeURIComponent(id)}&${options()}`, post: true, size: $("k").value,
                what: `images like ${name}`, describe: hitsLine(`like ${name}`) });
}

async function searchImage() {
  if (!uploaded) return;
  paging = null;
  $("pager").hidden = true;
  setStatus(`images like ${uploaded.name}…`);
  try {
    const result = await api(`/api/search-image?${options()}`, {
      method: "POST", body: uploaded, headers: { "Content-Type": uploaded.type || "application/octet-stream" } });
    $("results").classList.add("grid");
    renderCards(result.hits, 0);
    setStatus(`${hitsLine("uploaded image")(result, result.hits)} · ${result.ms} ms`);
  } catch (e) {
    setStatus(`images like ${uploaded.name} failed: ${e.message}`, true);
  }
}

function addCondition(event) {
  event.preventDefault();
  const field = $("condition-field").value.trim();
  const value = $("condition-value").value.trim();
  if (!field || !value) return;
  conditions.push(`${field}${$("condition-op").value}${value}`);
  $("condition-field").value = $("condition-value").value = "";
  showConditions();
}

function showConditions() {
  $("conditions").replaceChildren(...conditions.map((text, i) => {
    const chip = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = text;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove this condition";
    remove.addEventListener("click", () => { conditions.splice(i, 1); showConditions(); });
    chip.append(label, remove);
    return chip;
  }));
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

async function captionHit(node, id, button) {
  const caption = node.querySelector(".caption");
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
  $("browse-button").addEventListener("click", browse);
  $("condition-form").addEventListener("submit", addCondition);
  $("duplicates-button").addEventListener("click", duplicates);
  $("previous-page").addEventListener("click", () => turn(-1));
  $("next-page").addEventListener("click", () => turn(1));
  $("upload").addEventListener("change", chooseFile);
  $("image-search-button").addEventListener("click", searchImage);
  $("caption-button").addEventListener("click", captionUpload);
  $("strip-close").addEventListener("click", () => { $("strip-player").pause(); $("scene-strip").hidden = true; });
  loadStats();
});
