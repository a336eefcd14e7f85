# Runs inside a fresh VM on the job's image.
echo "hello from $(hostname), a disposable VM"
uname -a
cat /etc/os-release
echo "this line goes to stderr" >&2
df -h /
