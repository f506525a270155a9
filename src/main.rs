fn main() {
    println!("nvseal");
}
