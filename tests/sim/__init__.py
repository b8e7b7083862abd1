"""Tests of the simulators and the scenario generator."""
