"""The `salora` command line. It sits above both packages: `salora` (the trainer library) and
`gateway` (the server) never import it."""
