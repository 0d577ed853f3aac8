import pytest


# A real first boot of its own (a cold VM), where the image's other tests may share a warm one.
@pytest.mark.racker(needs=["first-boot"])
def test_cloud_init_finished_this_boot(host):
    finished = host.file("/var/lib/cloud/instance/boot-finished")
    assert finished.exists
    assert host.run("cloud-init status --wait").rc == 0
