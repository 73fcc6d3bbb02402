// Swagger UI from this server's own copy (no CDN). validatorUrl: null stops it sending the schema
// to swagger.io's online validator, the one outside address it would otherwise contact.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
