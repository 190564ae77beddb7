// diffusionret web page: search box -> /api/search -> result cards with thumbnails and inline playback.
// Everything is inserted with textContent/attributes (never innerHTML): file names are untrusted.
"use strict";

const TOKEN_KEY = "diffusionret-token";

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function formatDuration(seconds, round = Math.round) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  const total = round(seconds);
  const m = Math.floor(total / 60);
  const s = String(total % 60).padStart(2, "0");
  return `${m}:${s}`;
}

function setStatus(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// A hit inside a longer video plays from its moment: a media fragment (#t=start,end) makes the
// player start there and pause at the end; currentTime is set too, for players that ignore it.
function hasMoment(hit) {
  return typeof hit.start === "number" && typeof hit.end === "number" && (hit.start > 0 ||
    (typeof hit.duration === "number" && hit.end < hit.duration - 0.05));
}

function playInline(card, hit) {
  const media = card.querySelector(".media");
  const video = document.createElement("video");
  if (hasMoment(hit)) {
    video.src = `${hit.media_url}#t=${hit.start.toFixed(3)},${hit.end.toFixed(3)}`;
    video.addEventListener("loadedmetadata", () => {
      if (Math.abs(video.currentTime - hit.start) > 0.25) video.currentTime = hit.start;
    }, { once: true });
  } else {
    video.src = hit.media_url;
  }
  video.dataset.start = String(hit.start ?? 0);
  video.controls = true;
  video.autoplay = true;
  video.preload = "metadata";
  media.replaceChildren(video);
}

function renderCard(hit) {
  const template = document.getElementById("card-template");
  const card = template.content.firstElementChild.cloneNode(true);
  card.dataset.id = hit.id;
  const thumb = card.querySelector(".thumb");
  thumb.src = hit.thumb_url;
  thumb.alt = hit.name;
  thumb.addEventListener("error", () => thumb.removeAttribute("src"), { once: true });
  card.querySelector(".rank").textContent = `#${hit.rank}`;
  const name = card.querySelector(".name");
  name.textContent = hit.name;
  name.title = hit.path;
  card.querySelector(".score").textContent = `score ${hit.score.toFixed(3)}`;
  card.querySelector(".duration").textContent = formatDuration(hit.duration);
  if (hasMoment(hit)) {
    card.querySelector(".moment").textContent =
      `${formatDuration(hit.start, Math.floor)}–${formatDuration(hit.end, Math.ceil)}`;
  }
  card.querySelector(".play").addEventListener("click", () => playInline(card, hit));
  thumb.addEventListener("click", () => playInline(card, hit));
  return card;
}

async function search(query, k) {
  const results = document.getElementById("results");
  setStatus("Searching…");
  const params = new URLSearchParams({ q: query, k: String(k) });
  let response;
  try {
    response = await fetch(`/api/search?${params}`, { headers: authHeaders() });
  } catch (err) {
    setStatus(`Cannot reach the server: ${err}`, true);
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    document.getElementById("token-form").hidden = false;
    setStatus("This server needs an access token.", true);
    return;
  }
  if (!response.ok) {
    setStatus(body.detail || `Search failed (HTTP ${response.status})`, true);
    return;
  }
  results.replaceChildren(...body.results.map(renderCard));
  const n = body.results.length;
  setStatus(`${n} result${n === 1 ? "" : "s"} for “${body.query}” in ${Math.round(body.took_ms)} ms`);
  history.replaceState(null, "", `?${params}`);
}

function main() {
  const form = document.getElementById("search-form");
  const queryInput = document.getElementById("query");
  const kSelect = document.getElementById("k");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = queryInput.value.trim();
    if (query) search(query, Number(kSelect.value));
  });
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
    document.getElementById("token-form").hidden = true;
    form.requestSubmit();
  });
  const params = new URLSearchParams(location.search);
  if (params.get("q")) {
    queryInput.value = params.get("q");
    if ([...kSelect.options].some((o) => o.value === params.get("k"))) kSelect.value = params.get("k");
    form.requestSubmit();
  }
}

document.addEventListener("DOMContentLoaded", main);
