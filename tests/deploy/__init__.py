"""Tests of the Dockerfile and of deploy/: the image, docker-mailserver, Kubernetes, systemd."""
