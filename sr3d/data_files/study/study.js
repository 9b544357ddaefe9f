// Reader study page: no network, no libraries. The case list comes from the
// JSON block in index.html; which method made which image is not in the page.
(function () {
  "use strict";

  var STUDY = JSON.parse(document.getElementById("study-data").textContent);
  var CASES = STUDY.cases;
  var N = CASES.length;
  var STORAGE_KEY = "sr3d-study:" + STUDY.study_id;
  var ZOOMS = [2, 3, 4, 6, 8];
  var PANEL_IDS = ["panel-left", "panel-ref", "panel-right"];
  var IMAGE_FIELDS = ["left", "ref", "right"];

  var state = null;          // {reader, answers: {case id: "left" | "right"}, current: index}
  var zoomIndex = 1;
  var pointer = null;        // {fx, fy}: pointer position as a fraction of the image, or null
  var storageWorks = true;
  var panels = PANEL_IDS.map(function (id) {
    var panel = document.getElementById(id);
    return { frame: panel.querySelector(".frame"), img: panel.querySelector("img"),
             loupe: panel.querySelector(".loupe") };
  });

  function $(id) { return document.getElementById(id); }

  // ------------------------------------------------------------------ storage

  function loadState() {
    try {
      var saved = JSON.parse(window.localStorage.getItem(STORAGE_KEY));
      if (saved && typeof saved.reader === "string" && saved.reader &&
          saved.answers && typeof saved.answers === "object") {
        saved.current = Math.max(0, Math.min(N, saved.current | 0));
        return saved;
      }
    } catch (error) {
      storageWorks = false;
    }
    return null;
  }

  function storeState() {
    try {
      window.localStorage.setItem(STORAGE_KEY, JSON.stringify(state));
    } catch (error) {
      storageWorks = false;
      $("storage-warning").hidden = false;
    }
  }

  function answeredCount() {
    var count = 0;
    CASES.forEach(function (c) { if (state.answers[c.id]) count += 1; });
    return count;
  }

  function firstUnanswered() {
    for (var i = 0; i < N; i += 1) {
      if (!state.answers[CASES[i].id]) return i;
    }
    return N;
  }

  // ------------------------------------------------------------------ screens

  function showScreen(name) {
    ["intro", "study", "done"].forEach(function (id) { $(id).hidden = id !== name; });
    $("bar").hidden = name === "intro";
  }

  function render() {
    var count = answeredCount();
    $("progress").textContent = count + " / " + N;
    $("reader-label").textContent = "Reader: " + state.reader;
    $("answers-file").textContent = fileName();
    $("prev").disabled = state.current === 0;
    if (state.current >= N) {
      $("case-label").textContent = "";
      pointer = null;
      showScreen("done");
      return;
    }
    var c = CASES[state.current];
    $("case-label").textContent = "Case " + (state.current + 1) + " of " + N;
    panels.forEach(function (panel, i) {
      var src = c[IMAGE_FIELDS[i]];
      if (panel.img.getAttribute("src") !== src) panel.img.setAttribute("src", src);
      panel.loupe.style.backgroundImage = "url(\"" + src + "\")";
    });
    var chosen = state.answers[c.id];
    $("answer-left").classList.toggle("chosen", chosen === "left");
    $("answer-right").classList.toggle("chosen", chosen === "right");
    showScreen("study");
    layout();
    preload(state.current + 1);
  }

  function preload(index) {
    if (index >= N) return;
    IMAGE_FIELDS.forEach(function (field) { new Image().src = CASES[index][field]; });
  }

  // Integer magnification when the images fit at least once, so every pixel
  // is drawn as a square of the same size.
  function layout() {
    if (state.current >= N) return;
    var c = CASES[state.current];
    var availableWidth = (window.innerWidth - 64) / 3;
    var availableHeight = window.innerHeight - 190;
    var fit = Math.min(availableWidth / c.width, availableHeight / c.height);
    var factor = fit >= 1 ? Math.floor(fit) : Math.max(fit, 0.25);
    panels.forEach(function (panel) {
      panel.frame.style.width = Math.round(c.width * factor) + "px";
      panel.frame.style.height = Math.round(c.height * factor) + "px";
    });
    moveLoupes();
  }

  // ------------------------------------------------------------------ loupe

  function moveLoupes() {
    var zoom = ZOOMS[zoomIndex];
    $("zoom-label").textContent = zoom + "x";
    panels.forEach(function (panel) {
      if (!pointer || state.current >= N) {
        panel.loupe.classList.remove("on");
        return;
      }
      var width = panel.frame.clientWidth;
      var height = panel.frame.clientHeight;
      var radius = panel.loupe.offsetWidth / 2 || 90;
      var x = pointer.fx * width;
      var y = pointer.fy * height;
      panel.loupe.style.left = (x - radius) + "px";
      panel.loupe.style.top = (y - radius) + "px";
      panel.loupe.style.backgroundSize = (width * zoom) + "px " + (height * zoom) + "px";
      panel.loupe.style.backgroundPosition = (radius - x * zoom) + "px " + (radius - y * zoom) + "px";
      panel.loupe.classList.add("on");
    });
  }

  function onPointerMove(event) {
    var rect = event.currentTarget.getBoundingClientRect();
    pointer = {
      fx: Math.max(0, Math.min(1, (event.clientX - rect.left) / rect.width)),
      fy: Math.max(0, Math.min(1, (event.clientY - rect.top) / rect.height)),
    };
    moveLoupes();
  }

  function onPointerLeave() {
    pointer = null;
    moveLoupes();
  }

  function changeZoom(step) {
    zoomIndex = Math.max(0, Math.min(ZOOMS.length - 1, zoomIndex + step));
    moveLoupes();
  }

  // ------------------------------------------------------------------ answers

  function answer(side) {
    if (!state || state.current >= N) return;
    state.answers[CASES[state.current].id] = side;
    var next = state.current + 1;
    state.current = next < N ? next : firstUnanswered();
    storeState();
    render();
  }

  function previous() {
    if (!state || state.current === 0) return;
    state.current -= 1;
    storeState();
    render();
  }

  function fileName() {
    var safe = state.reader.replace(/[^A-Za-z0-9_-]+/g, "_").replace(/^_+|_+$/g, "");
    return "answers_" + (safe || "reader") + ".json";
  }

  function saveAnswers() {
    var ordered = {};
    CASES.forEach(function (c) { if (state.answers[c.id]) ordered[c.id] = state.answers[c.id]; });
    var payload = {
      study_id: STUDY.study_id,
      reader: state.reader,
      answers: ordered,
      completed: answeredCount() === N,
      n_cases: N,
      timestamp: new Date().toISOString(),
    };
    var blob = new Blob([JSON.stringify(payload, null, 2) + "\n"], { type: "application/json" });
    var link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = fileName();
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 1000);
  }

  function newReader() {
    var message = "Start again for a new reader? The answers of " + state.reader +
                  " kept in this browser are deleted (save them first).";
    if (!window.confirm(message)) return;
    try { window.localStorage.removeItem(STORAGE_KEY); } catch (error) { /* nothing stored */ }
    state = null;
    $("reader-name").value = "";
    showScreen("intro");
    $("reader-name").focus();
  }

  function start(event) {
    event.preventDefault();
    var name = $("reader-name").value.trim();
    if (!name) return;
    state = { reader: name, answers: {}, current: 0 };
    $("reader-name").blur();
    storeState();
    render();
  }

  function onKey(event) {
    // The name field lives on the intro screen only. Its focus is not a reliable test: a field
    // that has just been hidden keeps the focus until the browser's next rendering update.
    if (!state || !$("intro").hidden || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
      event.preventDefault();
      // A held key must not race through the cases.
      if (!event.repeat) answer(event.key === "ArrowLeft" ? "left" : "right");
    } else if (event.key === "Backspace") {
      event.preventDefault();
      previous();
    } else if (event.key === "+" || event.key === "=") {
      changeZoom(1);
    } else if (event.key === "-" || event.key === "_") {
      changeZoom(-1);
    }
  }

  // ------------------------------------------------------------------ wiring

  panels.forEach(function (panel) {
    panel.frame.addEventListener("pointermove", onPointerMove);
    panel.frame.addEventListener("pointerdown", onPointerMove);
    panel.frame.addEventListener("pointerleave", onPointerLeave);
  });
  $("answer-left").addEventListener("click", function () { answer("left"); });
  $("answer-right").addEventListener("click", function () { answer("right"); });
  $("prev").addEventListener("click", previous);
  $("save").addEventListener("click", saveAnswers);
  $("new-reader").addEventListener("click", newReader);
  $("start-form").addEventListener("submit", start);
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", layout);

  state = loadState();
  if (!storageWorks) $("storage-warning").hidden = false;
  if (state) {
    render();
  } else {
    showScreen("intro");
    $("reader-name").focus();
  }
})();
