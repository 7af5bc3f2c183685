// Starts Swagger UI on /docs from the local bundle (no inline script, no CDN, no validator
// badge: nothing leaves the hospital network). "Try it out" requests carry the session's
// CSRF token, which every unsafe request needs.
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  var csrf = root.getAttribute("data-csrf-token");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    requestInterceptor: function (req) {
      if (!/^(GET|HEAD|OPTIONS)$/i.test(req.method || "GET")) {
        req.headers["X-CSRF-Token"] = csrf;
      }
      return req;
    },
  });
})();
