// The polyalign search page: text search, "more like this" and search by image against the service's /search.
// Plain JS, no build step. The URL keeps the query (?q=…, ?like=…, &target=…, &k=…) so a search can be shared.
"use strict";

(function () {
  const $ = (sel) => document.querySelector(sel);
  const form = $("#search-form"), query = $("#query"), target = $("#target"), kSel = $("#k");
  const statusEl = $("#status"), infoEl = $("#query-info"), errorEl = $("#error"), results = $("#results");
  const drop = $("#drop"), fileInput = $("#file"), preview = $("#drop-preview"), cardTpl = $("#card");
  const DEFAULT_K = "10", DEFAULT_TARGET = "image";

  let seq = 0;          // the number of the latest request: a slower, older answer is dropped
  let last = null;      // the last search ({kind, text|like|file}), rerun when target or k changes
  let previewUrl = null;

  // ---- small helpers -------------------------------------------------------------------------------------------
  function setOption(select, value) {
    if (value == null) return;
    if (![...select.options].some((o) => o.value === value)) {
      const opt = document.createElement("option");  // a k from a shared URL that the list lacks
      opt.value = opt.textContent = value;
      select.appendChild(opt);
    }
    select.value = value;
  }

  function showError(message) {
    errorEl.textContent = message;
    errorEl.hidden = false;
  }

  function clearError() {
    errorEl.textContent = "";
    errorEl.hidden = true;
  }

  function formatMs(ms) {
    const n = Number(ms);
    if (!isFinite(n)) return "";
    return n < 10 ? n.toFixed(1) : String(Math.round(n));
  }

  function describe(search) {
    if (search.kind === "text") return `for “${search.text}”`;
    if (search.kind === "like") return `like item ${search.like}`;
    return `like image ${search.file.name || "upload"}`;
  }

  // ---- URL sync ------------------------------------------------------------------------------------------------
  function urlFor(search) {
    const p = new URLSearchParams();
    if (search && search.kind === "text" && search.text) p.set("q", search.text);
    if (search && search.kind === "like") p.set("like", search.like);
    if (target.value !== DEFAULT_TARGET) p.set("target", target.value);
    if (kSel.value !== DEFAULT_K) p.set("k", kSel.value);
    const qs = p.toString();
    return location.pathname + (qs ? "?" + qs : "");
  }

  function syncUrl(search, push) {
    const url = urlFor(search);
    if (url === location.pathname + location.search) return;
    (push ? history.pushState : history.replaceState).call(history, null, "", url);
  }

  function fromUrl() {
    const p = new URLSearchParams(location.search);
    setOption(target, p.get("target") || DEFAULT_TARGET);
    setOption(kSel, p.get("k") || DEFAULT_K);
    if (p.has("q")) {
      query.value = p.get("q");
      return { kind: "text", text: p.get("q") };
    }
    if (p.has("like")) return { kind: "like", like: p.get("like") };
    return null;
  }

  // ---- requests ------------------------------------------------------------------------------------------------
  async function run(search, { push = true } = {}) {
    last = search;
    const mine = ++seq;
    clearError();
    results.dataset.state = "loading";
    results.setAttribute("aria-busy", "true");
    statusEl.textContent = "Searching…";
    infoEl.textContent = describe(search);
    if (search.kind !== "image") syncUrl(search, push);
    else syncUrl(null, push);

    let response, body = null;
    try {
      if (search.kind === "image") {
        const data = new FormData();
        data.append("file", search.file, search.file.name || "upload");
        data.append("k", kSel.value);
        data.append("target", target.value);
        response = await fetch("/search", { method: "POST", body: data });
      } else {
        const p = new URLSearchParams();
        if (search.kind === "text") p.set("text", search.text);
        else p.set("like", search.like);
        p.set("k", kSel.value);
        p.set("target", target.value);
        response = await fetch("/search?" + p.toString(), { headers: { Accept: "application/json" } });
      }
      try { body = await response.json(); } catch (_) { body = null; }
    } catch (err) {
      if (mine === seq) fail(`Could not reach the search service: ${err.message || err}`);
      return;
    }
    if (mine !== seq) return;  // a newer search started meanwhile
    if (!response.ok || !body || !Array.isArray(body.results)) {
      const message = body && body.error ? body.error
        : `The search failed (HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}).`;
      fail(message);
      return;
    }
    render(body);
  }

  function fail(message) {
    showError(message);
    results.replaceChildren();
    statusEl.textContent = "";
    results.dataset.state = "error";
    results.dataset.seq = String(seq);
    results.removeAttribute("aria-busy");
  }

  function render(body) {
    const isText = body.target === "text";
    results.classList.toggle("text", isText);
    const cards = body.results.map((r) => card(r, isText));
    if (!cards.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No results.";
      cards.push(p);
    }
    results.replaceChildren(...cards);
    const n = body.results.length;
    statusEl.textContent = `${n} result${n === 1 ? "" : "s"} in ${formatMs(body.took_ms)} ms`;
    results.dataset.state = "done";
    results.dataset.seq = String(seq);
    results.removeAttribute("aria-busy");
  }

  function card(r, isText) {
    const node = cardTpl.content.firstElementChild.cloneNode(true);
    node.dataset.id = r.id;
    node.dataset.rank = r.rank;
    if (isText) node.classList.add("text");
    const thumb = node.querySelector(".thumb"), img = node.querySelector("img");
    if (r.image_url) {
      img.src = r.image_url;
      img.alt = r.caption || r.id;
      thumb.href = r.image_url;
      img.addEventListener("error", () => thumb.classList.add("none"), { once: true });
    } else {
      thumb.classList.add("none");
      thumb.removeAttribute("href");
      img.remove();
    }
    node.querySelector(".rank").textContent = `#${r.rank}`;
    node.querySelector(".score").textContent = Number(r.score).toFixed(3);
    node.querySelector(".caption").textContent = r.caption || "";
    const id = node.querySelector(".id");
    id.textContent = r.id;
    id.title = `item ${r.id}`;
    if (r.item_url) id.href = r.item_url; else id.removeAttribute("href");
    node.querySelector(".more").addEventListener("click", () => {
      query.value = "";
      run({ kind: "like", like: r.id });
      window.scrollTo({ top: 0, behavior: "smooth" });
    });
    return node;
  }

  // ---- search by image -----------------------------------------------------------------------------------------
  function searchImage(file) {
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    if (file.type && file.type.startsWith("image/")) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      preview.hidden = false;
    } else {
      preview.hidden = true;  // the service says what is wrong with it
    }
    query.value = "";
    run({ kind: "image", file });
  }

  drop.addEventListener("click", () => fileInput.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); fileInput.click(); }
  });
  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    searchImage(file);
    fileInput.value = "";  // choosing the same file again searches again
  });
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "dragend"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    searchImage(file);
  });
  // a file dropped next to the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); searchImage(item.getAsFile()); }
  });

  // ---- text search, target and k -------------------------------------------------------------------------------
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    run({ kind: "text", text: query.value.trim() });
  });
  [target, kSel].forEach((select) => select.addEventListener("change", () => {
    if (last) run(last, { push: false });
    else syncUrl(null, false);
  }));
  window.addEventListener("popstate", () => {
    const search = fromUrl();
    if (search) run(search, { push: false });
  });

  // ---- start ---------------------------------------------------------------------------------------------------
  fetch("/healthz").then((r) => (r.ok ? r.json() : null)).then((h) => {
    if (!h) return;
    const run = String(h.run || "").replace(/[\\/]+$/, "").split(/[\\/]/).pop();  // the run's folder name
    const parts = [run, `${h.items} items`, h.texts != null ? `${h.texts} captions` : null, `dim ${h.dim}`];
    const el = $("#health");
    el.textContent = parts.filter(Boolean).join(" · ");
    el.title = `run ${h.run || "?"}, ${h.kind || "?"} index`;
  }).catch(() => {});

  const initial = fromUrl();
  if (initial) run(initial, { push: false });
})();
