fn main(){ println!("x"); }
