"""Tests of the dashboards, the Prometheus rules and the docker-compose stack."""
