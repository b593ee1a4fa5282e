"""The HTTP face of the suite: REST routes, the live websocket feed and the admin page, speaking
only gRPC to the training and metrics services. Entry points: `gateway.app.create_app` and
`gateway.cli.run` (`oneseek gateway`)."""
