// Refreshes the numbers of a usage page from its JSON every few seconds,
// and filters the overview's rows as the filter box is typed in. The page
// reads right without it: every number is in the HTML.
(function () {
  "use strict";
  var body = document.body;
  var kind = body.getAttribute("data-kind");
  var source = body.getAttribute("data-source");
  if (kind === "customer") {
    source = location.pathname + location.search + "&format=json";
  }
  var status = document.getElementById("status");
  var refreshes = 0;

  function group(n) { return Number(n).toLocaleString("en-US"); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function fraction(u) {
    if (u.limit === null) { return null; }
    return u.limit === 0 ? 1 : u.used / u.limit;
  }
  function closest(usage) {
    var best = null;
    Object.keys(usage).forEach(function (d) {
      var f = fraction(usage[d]);
      if (f !== null && (best === null || f > best)) { best = f; }
    });
    return best;
  }
  function anyAtLimit(usage) {
    return Object.keys(usage).some(function (d) {
      return usage[d].limit !== null && usage[d].used >= usage[d].limit;
    });
  }

  // The same markup as the server's templates/bar.html.
  function fill(cell, u) {
    while (cell.firstChild) { cell.removeChild(cell.firstChild); }
    var nums = el("span", "nums");
    if (u.limit === null) {
      nums.append(el("span", "used", group(u.used)), " used · ", el("span", "limit", "unlimited"));
      cell.append(nums);
      return;
    }
    var max = Math.max(u.limit, 1);
    var meter = el("meter");
    meter.min = 0;
    meter.max = max;
    // As the server draws it: past 90 % of the limit the bar turns red.
    meter.low = Math.floor(max * 3 / 4);
    meter.high = Math.floor(max * 9 / 10);
    meter.optimum = 0;
    meter.value = Math.min(Math.max(u.used, 0), max);
    meter.setAttribute("aria-label", cell.getAttribute("data-label") + " used of limit");
    nums.append(el("span", "used", group(u.used)), " of ", el("span", "limit", group(u.limit)),
      " · ", el("span", "pct", (fraction(u) * 100).toFixed(1)), "% · ",
      el("span", "remaining", group(u.remaining)), " left");
    var state = u.used > u.limit ? "Over limit" : (u.used === u.limit ? "At limit" : "");
    cell.append(meter, nums, el("strong", "state", state));
  }

  function update(scope, summary) {
    Object.keys(summary.usage).forEach(function (d) {
      var cell = scope.querySelector('[data-dim="' + d + '"]');
      if (cell) { fill(cell, summary.usage[d]); }
    });
    ["periodStart", "periodEnd"].forEach(function (field) {
      var node = scope.querySelector('[data-field="' + field + '"]');
      if (node && summary[field]) { node.textContent = summary[field]; }
    });
    var c = closest(summary.usage);
    scope.setAttribute("data-closest", c === null ? "-1" : String(c));
  }

  function sortRows(tbody) {
    var rows = Array.prototype.slice.call(tbody.querySelectorAll("tr[data-org]"));
    rows.sort(function (a, b) {
      var d = Number(b.getAttribute("data-closest")) - Number(a.getAttribute("data-closest"));
      if (d !== 0) { return d; }
      return a.getAttribute("data-org") < b.getAttribute("data-org") ? -1 : 1;
    });
    rows.forEach(function (row) { tbody.appendChild(row); });
  }

  function filter() {
    var box = document.getElementById("q");
    var tbody = document.getElementById("orgs");
    if (!box || !tbody) { return; }
    var q = box.value.trim().toLowerCase();
    var shown = 0;
    tbody.querySelectorAll("tr[data-org]").forEach(function (row) {
      var text = (row.getAttribute("data-org") + " " + row.getAttribute("data-plan")).toLowerCase();
      row.hidden = q !== "" && text.indexOf(q) === -1;
      if (!row.hidden) { shown += 1; }
    });
    var none = document.getElementById("none");
    if (none) { none.hidden = shown !== 0; }
  }

  function apply(data) {
    if (kind === "overview") {
      var tbody = document.getElementById("orgs");
      data.orgs.forEach(function (summary) {
        var row = tbody.querySelector('tr[data-org="' + CSS.escape(summary.org) + '"]');
        if (row) { update(row, summary); }
      });
      sortRows(tbody);
      filter();
    } else {
      update(document.getElementById("usage"), data);
      var upgrade = document.getElementById("upgrade");
      if (upgrade) { upgrade.hidden = !anyAtLimit(data.usage); }
    }
  }

  function say(text) { if (status) { status.textContent = text; } }

  function refresh() {
    fetch(source, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.json().then(function (json) { return { ok: response.ok, code: response.status, json: json }; });
      })
      .then(function (answer) {
        if (!answer.ok) {
          var message = answer.json && answer.json.error ? answer.json.error.message : "error";
          say("Could not refresh (" + answer.code + "): " + message + ". The numbers shown may be out of date.");
          return;
        }
        apply(answer.json);
        refreshes += 1;
        body.setAttribute("data-refreshes", String(refreshes));
        say("Updated " + new Date().toLocaleTimeString("en-GB") + ".");
      })
      .catch(function () { say("Could not refresh: the gateway did not answer. The numbers shown may be out of date."); });
  }

  var box = document.getElementById("q");
  if (box) { box.addEventListener("input", filter); }
  if (source) { setInterval(refresh, 5000); }
}());
