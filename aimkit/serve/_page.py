"""The demo's one HTML page: a form, a status line and the grid.

The form works without JavaScript (it submits to ``generate`` and the browser shows the PNG); with
JavaScript the grid appears under the form and a refused request shows the server's one-line
message. Every value put into the page is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from string import Template

__all__ = ["render_page"]

_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aimkit · $name</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 60rem; }
  h1 { font-size: 1.3rem; margin: 0 0 1rem; }
  form { display: grid; grid-template-columns: repeat(auto-fill, minmax(11rem, 1fr)); gap: .6rem 1rem;
         align-items: end; }
  label { display: flex; flex-direction: column; font-size: .85rem; color: #555; }
  input, select, button { font: inherit; padding: .25rem .4rem; }
  button { cursor: pointer; }
  #status { min-height: 1.4em; margin: .8rem 0; }
  #status.error { color: #b00020; }
  #grid { image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; }
  #grid:not([src]) { display: none; }
</style>
</head>
<body>
<h1>aimkit · $name</h1>
<form id="form" action="generate" method="get">
  <label>class <select name="class" id="class">$options</select></label>
  <label>guidance (cfg_scale) <input name="cfg_scale" id="cfg_scale" inputmode="decimal" value="$cfg_scale"></label>
  <label>temperature <input name="temperature" id="temperature" inputmode="decimal" value="$temperature"></label>
  <label>top-k (0 = all) <input name="top_k" id="top_k" inputmode="numeric" value="$top_k"></label>
  <label>top-p (1 = all) <input name="top_p" id="top_p" inputmode="decimal" value="$top_p"></label>
  <label>seed (blank = random) <input name="seed" id="seed" inputmode="numeric" value=""></label>
  <label>count (1 to $max_count) <input name="count" id="count" inputmode="numeric" value="$count"></label>
  <button type="submit" id="go">Generate</button>
</form>
<p id="status" role="status"></p>
<img id="grid" alt="generated grid">
<script>
(function () {
  var form = document.getElementById("form");
  var button = document.getElementById("go");
  var status = document.getElementById("status");
  var grid = document.getElementById("grid");
  function say(text, isError) { status.textContent = text; status.className = isError ? "error" : ""; }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var query = new URLSearchParams(new FormData(form)).toString();
    button.disabled = true;
    say("generating…", false);
    var answer;
    fetch("generate?" + query, { cache: "no-store" }).then(function (response) {
      answer = response;
      return response.ok ? response.blob() : response.text();
    }).then(function (body) {
      if (!answer.ok) { say(String(body).trim(), true); return; }
      if (grid.dataset.url) { URL.revokeObjectURL(grid.dataset.url); }
      grid.dataset.url = URL.createObjectURL(body);
      grid.src = grid.dataset.url;
      say("seed " + answer.headers.get("X-Aimkit-Seed") + " · " + answer.headers.get("X-Aimkit-Seconds") +
          " s", false);
    }).catch(function (error) {
      say("no answer from the server: " + error, true);
    }).finally(function () { button.disabled = false; });
  });
})();
</script>
</body>
</html>
""")


def _options(class_names: list[str], random_label: str) -> str:
    # blank is "a random class" whatever the classes are called (a class may be named "random")
    rows = [f'<option value="">{escape(random_label)}</option>']
    rows += [f'<option value="{escape(name)}">{escape(name)}</option>' for name in class_names]
    return "".join(rows)


def render_page(app) -> str:
    """The page for a :class:`~aimkit.serve.app.DemoApp`, pre-filled with its model's sampling defaults."""
    from .app import RANDOM_CLASS

    defaults = app.defaults
    return _PAGE.substitute(
        name=escape(app.name),
        options=_options(app.class_names, RANDOM_CLASS),
        cfg_scale=escape(f"{defaults.cfg_scale:g}"),
        temperature=escape(f"{defaults.temperature:g}"),
        top_k=escape(str(defaults.top_k)),
        top_p=escape(f"{defaults.top_p:g}"),
        max_count=app.max_count,
        count=min(4, app.max_count),
    )
